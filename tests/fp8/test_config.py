"""train.fp8's refusals (docs/fp8.md): each bad combination is one line naming the key and what
would run - from the config alone (validate), against the layout (check_layout, parallelize),
against the device (resolve_fp8) and on the command line (exit 2, nothing written)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moetrain.config import ConfigError, compose, to_object, validate
from moetrain.fp8 import plan as fp8_plan
from moetrain.fp8 import resolve_fp8
from moetrain.parallel import LayoutError, ParallelDims, check_layout
from tests.fp8 import needs_torchao
from tests.harness import run_train


def config(*overrides):
    return to_object(compose(["+experiment=tiny", *overrides]))


@pytest.mark.parametrize("overrides, needle", [
    (["train.fp8_backend=te"], "train.fp8_backend='te' is invalid: needs train.fp8 set"),
    (["train.fp8_output_head=true"], "train.fp8_output_head=True is invalid: needs train.fp8"),
    (["train.fp8=rowwise", "train.fp8_backend=te"],
     "train.fp8='rowwise' is invalid: has no Transformer Engine recipe"),
    (["train.fp8=tensorwise", "train.fp8_output_head=true", "model.tie_embeddings=true"],
     "train.fp8_output_head=True is invalid: cannot be combined with model.tie_embeddings"),
    (["train.fp8=mxfp8", "model.moe.expert_hidden=208"],
     "model.moe.expert_hidden=208 is invalid: must be a multiple of 32 with train.fp8=mxfp8"),
    (["train.fp8=rowwise", "model.d_model=72", "model.n_heads=4", "model.n_kv_heads=2"],
     "model.d_model=72 is invalid: must be a multiple of 16"),
])
def test_the_config_refuses(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(config(*overrides))
    assert str(err.value).startswith(needle)
    assert "\n" not in str(err.value)


def test_every_recipe_is_a_valid_config():
    for recipe in ("none", "tensorwise", "rowwise", "mxfp8"):
        validate(config(f"train.fp8={recipe}"))
    validate(config("train.fp8=mxfp8", "train.fp8_backend=te", "train.fp8_output_head=true"))


@pytest.mark.parametrize("world, overrides, keys", [
    (4, ["train.fp8=tensorwise", "parallel.ep=2", "parallel.etp=2"], ("train.fp8", "parallel.etp")),
    (4, ["train.fp8=rowwise", "parallel.ep=2", "parallel.etp=2"], ("train.fp8", "parallel.etp")),
    (2, ["train.fp8=tensorwise", "parallel.cp=2"], ("train.fp8", "parallel.cp")),
    (2, ["train.fp8=tensorwise", "parallel.tp=2", "model.moe.num_shared_experts=1"],
     ("train.fp8", "parallel.tp", "model.moe.num_shared_experts")),
    (4, ["train.fp8=mxfp8", "parallel.etp=4", "model.moe.expert_hidden=192"],
     ("train.fp8", "parallel.etp", "model.moe.expert_hidden")),
    (1, ["train.fp8=mxfp8", "train.micro_batch_size=1", "data.seq_len=48"],
     ("train.fp8", "train.micro_batch_size", "data.seq_len")),
    (2, ["train.fp8=tensorwise", "train.fp8_backend=te", "parallel.tp=2"],
     ("train.fp8_backend", "parallel.tp")),
])
def test_the_layout_refuses(world, overrides, keys):
    cfg = config(*overrides)
    validate(cfg)
    with pytest.raises(LayoutError) as err:
        check_layout(cfg, world)
    assert err.value.keys == keys
    assert str(err.value).startswith(f"{keys[0]}=") and "\n" not in str(err.value)


@pytest.mark.parametrize("world, overrides", [
    (2, ["train.fp8=tensorwise", "parallel.tp=2"]),  # DTensor amax over the TP shards
    (2, ["train.fp8=rowwise", "parallel.cp=2"]),
    (4, ["train.fp8=mxfp8", "parallel.ep=2", "parallel.etp=2"]),  # 96 = 3 blocks per shard
    (2, ["train.fp8=mxfp8", "parallel.tp=2", "model.moe.num_shared_experts=1"]),
])
def test_the_layout_accepts(world, overrides):
    check_layout(config(*overrides), world)


@needs_torchao
def test_a_tensor_parallel_shard_off_the_mxfp8_blocks_is_refused():
    """parallelize (on the meta device, 4 ranks of a fake process group): MXFP8 at tp4 splits
    attention.wk's 64 output features into 16 per rank, not a block of 32."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moetrain.fp8 import FP8Plan
    from moetrain.model import Transformer
    from moetrain.parallel.mesh import build_meshes
    from moetrain.parallel.parallelize import BatchShape, parallelize
    from moetrain.parallel.rank import RankLayout

    cfg = config("parallel.tp=4")
    dims = ParallelDims.from_config(cfg.parallel, 4)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        rank = RankLayout(dims, 0, torch.device("meta"), build_meshes(dims, "cpu"))
        with torch.device("meta"):
            model = Transformer(cfg.model)
        with pytest.raises(LayoutError) as err:
            parallelize(model, rank, cfg.parallel, BatchShape(2, 8, 128), fp8=FP8Plan("mxfp8"))
        assert str(err.value) == (
            "train.fp8=mxfp8 with parallel.tp=4: layers.0.attention.wk holds 16 of its 64 output "
            "features per rank, not a multiple of 32; use a smaller parallel.tp")
        with torch.device("meta"):
            model = Transformer(cfg.model)
        parallelize(model, rank, cfg.parallel, BatchShape(2, 8, 128), fp8=FP8Plan("rowwise"))
    finally:
        dist.destroy_process_group()


class _Train:
    def __init__(self, **kw):
        self.fp8, self.fp8_backend, self.fp8_output_head, self.compile = "none", "torchao", False, False
        self.__dict__.update(kw)


@needs_torchao
def test_on_the_cpu_every_torchao_recipe_runs_emulated():
    assert resolve_fp8(_Train(), torch.device("cpu")) is None
    for recipe in ("tensorwise", "rowwise", "mxfp8"):
        plan = resolve_fp8(_Train(fp8=recipe), torch.device("cpu"))
        assert (plan.recipe, plan.backend, plan.emulate) == (recipe, "torchao", True)


@pytest.mark.parametrize("train, needle", [
    (_Train(fp8="tensorwise", fp8_backend="te"),
     "train.fp8_backend=te is invalid on the cpu: Transformer Engine runs on NVIDIA GPUs only; "
     "train.fp8_backend=torchao runs every recipe here, emulated"),
    (_Train(fp8="mxfp8", compile=True), "train.compile=true is invalid with train.fp8=mxfp8"),
])
@needs_torchao
def test_the_cpu_refuses(train, needle):
    with pytest.raises(ConfigError, match="^" + needle.replace(".", r"\.")):
        resolve_fp8(train, torch.device("cpu"))


def test_without_torchao_a_recipe_is_refused(monkeypatch):
    monkeypatch.setattr(fp8_plan, "torchao_available", lambda: False)
    assert resolve_fp8(_Train(), torch.device("cpu")) is None  # train.fp8=none needs no torchao
    with pytest.raises(ConfigError) as err:
        resolve_fp8(_Train(fp8="rowwise"), torch.device("cpu"))
    assert str(err.value) == ("train.fp8=rowwise is invalid here: torchao is not installed "
                              "(pip install 'moetrain[fp8]'), or set train.fp8=none")


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of a given compute capability, as resolve_fp8 sees it."""
    def make(capability, name="NVIDIA H100 80GB HBM3", mxfp8_kernels=False, te=False):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(fp8_plan, "_mxfp8_kernels", lambda: mxfp8_kernels)
        real = fp8_plan.importlib.util.find_spec
        monkeypatch.setattr(fp8_plan.importlib.util, "find_spec",
                            lambda n: object() if n == "transformer_engine" and te
                            else (None if n == "transformer_engine" else real(n)))
        return torch.device("cuda", 0)
    return make


@needs_torchao
def test_a_hopper_runs_the_fp8_recipes_and_refuses_mxfp8(gpu):
    device = gpu((9, 0))
    for recipe in ("tensorwise", "rowwise"):
        plan = resolve_fp8(_Train(fp8=recipe), device)
        assert (plan.recipe, plan.emulate) == (recipe, False)
    with pytest.raises(ConfigError) as err:
        resolve_fp8(_Train(fp8="mxfp8"), device)
    assert str(err.value) == (
        "train.fp8=mxfp8 is invalid on NVIDIA H100 80GB HBM3 (compute capability 9.0): it needs "
        "compute capability 10.0; tensorwise and rowwise would run here")


@needs_torchao
def test_an_ampere_runs_no_fp8(gpu):
    with pytest.raises(ConfigError, match="no FP8 recipe runs here: set train.fp8=none$"):
        resolve_fp8(_Train(fp8="tensorwise"), gpu((8, 0), name="NVIDIA A100"))


@needs_torchao
def test_a_blackwell_needs_torchao_kernels_for_mxfp8(gpu):
    with pytest.raises(ConfigError, match="needs torchao's SM100 kernels .* tensorwise and "
                                          "rowwise would run here"):
        resolve_fp8(_Train(fp8="mxfp8"), gpu((10, 0), name="NVIDIA B200"))
    plan = resolve_fp8(_Train(fp8="mxfp8", fp8_backend="te"),
                       gpu((10, 0), name="NVIDIA B200", mxfp8_kernels=True, te=True))
    assert (plan.recipe, plan.backend, plan.emulate) == ("mxfp8", "te", False)


@needs_torchao
def test_transformer_engine_must_be_installed(gpu):
    with pytest.raises(ConfigError, match="^train.fp8_backend=te is invalid here: "
                                          "transformer_engine is not installed"):
        resolve_fp8(_Train(fp8="tensorwise", fp8_backend="te"), gpu((9, 0)))


@needs_torchao
def test_the_command_line_refuses_in_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = run_train([f"run.dir={run}", "train.fp8=mxfp8", "train.fp8_backend=te"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: train.fp8_backend=te is invalid on the cpu: Transformer Engine runs on NVIDIA "
        "GPUs only; train.fp8_backend=torchao runs every recipe here, emulated"]
    assert not run.exists()
