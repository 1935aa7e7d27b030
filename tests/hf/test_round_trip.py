"""The Hugging Face round trip through a parallel layout, per family, on 4 forked gloo ranks:

    HF folder (tiny random model + the corpus tokenizer in HF form)
      -> model.init.from_hf into ep2 x tp2 (each rank reads its slices) -> checkpoint step_0
         == the HF tensors, bit-exact, every one (and once more into pp2 x etp2)
      -> 2 training steps -> checkpoint step_2 -> python -m moetrain.hf export
      -> AutoModelForCausalLM.from_pretrained: logits == moetrain's (rel. 1e-5)

and a DeepSeek-V3 with its multi-token-prediction layer written in the released layout
(model.layers.<n_layers>.*): imported into the MTP module (bit-exact), trained with it on ep2 x
tp2, exported with every MTP tensor (and the layer's copies of the embedding and head).
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import torch.distributed.fsdp  # noqa: F401 - imported in the parent for the forked ranks
import torch.distributed.tensor.parallel  # noqa: F401
from moetrain.checkpoint.convert import load_model_state
from moetrain.config.families import FAMILIES
from moetrain.config.schema import DataConfig
from moetrain.data import ensure_prepared
from moetrain.data.index import tokenizer_source
from moetrain.hf.config import folder_overrides, format_overrides
from moetrain.hf.load import check_init, use_hf_tokenizer
from moetrain.hf.tensors import to_hf_state
from moetrain.hf.tokenizer import sentencepiece_to_hf
from moetrain.model import Transformer
from moetrain.parallel import parallelize  # noqa: F401
from tests.harness import run_distributed, run_python, tiny_config, trainer_for
from tests.hf.families import VOCAB, rel_err, save_hf

LAYOUT = ["parallel.tp=2", "parallel.ep=2"]  # 4 ranks: dp2 x tp2 dense, ep2 x edp2 experts
# and one more import: pipeline stages x ETP (each rank a stage's half of every expert's width)
PP_CASE = ("deepseek_v3", ["parallel.pp=2", "parallel.pp_layers=[1,2]", "parallel.etp=2"])
MTP_CASE = "deepseek_v3-mtp"  # DeepSeek-V3 with its MTP layer, on LAYOUT
# Over the harness's tiny run (tests/harness): 2 steps of 4 micro-batches of one 32-token
# sequence, a checkpoint at the end, dropless, no warmup.
ROUND_TRIP = ["train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=1",
              "checkpoint.every=2", "data.seq_len=32", "model.moe.capacity_factor=null",
              "optim.warmup_steps=0"]


def _train(rank, world_size, jobs):
    torch.set_num_threads(1)
    for cfg, run_dir in jobs:
        trainer = trainer_for(cfg, run_dir)
        trainer.save_checkpoint()  # step_0: the imported weights as every rank holds them
        trainer.fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_round_trip")
    spm = tokenizer_source(ensure_prepared(DataConfig(), VOCAB))
    jobs, out = [], {}
    cases = [(family, family, LAYOUT) for family in FAMILIES]
    cases.append((f"{PP_CASE[0]}-pp2-etp2", PP_CASE[0], PP_CASE[1]))
    cases.append((MTP_CASE, "deepseek_v3", LAYOUT))
    for name, family, layout in cases:
        hf_dir = root / f"hf-{name}"
        save_hf(family, hf_dir, mtp_layers=1 if name == MTP_CASE else 0)
        sentencepiece_to_hf(spm, hf_dir)
        overrides = format_overrides(folder_overrides(hf_dir)).splitlines()
        cfg = tiny_config([*ROUND_TRIP, *layout, *overrides, f"model.init.from_hf={hf_dir}"], 4)
        check_init(cfg)
        use_hf_tokenizer(cfg)
        ensure_prepared(cfg.data, cfg.model.vocab_size)
        run_dir = root / f"run-{name}"
        run_dir.mkdir()
        # as moetrain.train writes it: the export reads the run's model config from it
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        jobs.append((cfg, run_dir))
        out[name] = (cfg, hf_dir, run_dir)
    run_distributed(_train, 4, jobs, timeout=900, pg_timeout=120)
    return out


@pytest.mark.parametrize("family", [*FAMILIES, f"{PP_CASE[0]}-pp2-etp2", MTP_CASE])
def test_import_into_a_parallel_layout_is_bit_exact(family, runs):
    cfg, hf_dir, run_dir = runs[family]
    imported = to_hf_state(load_model_state(run_dir / "checkpoints" / "step_0"), cfg.model)
    original = load_file(str(hf_dir / "model.safetensors"))
    assert imported.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(imported[name], t), name


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_checkpoint_exports_to_what_transformers_loads(family, runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, hf_dir, run_dir = runs[family]
    out = tmp_path / "export"
    done = run_python("-m", "moetrain.hf", "export", run_dir, out, "--max-shard-size", "100KB")
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)  # sharded, indexed
    assert f"({family}: {len(index['weight_map'])} tensors" in done.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert (out / "generation_config.json").is_file()

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    state = load_model_state(run_dir / "checkpoints" / "step_2")
    start = load_model_state(run_dir / "checkpoints" / "step_0")
    assert any(not torch.equal(state[k], start[k]) for k in state)  # it did train
    model = Transformer(cfg.model).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = rel_err(hf(tokens).logits, model(tokens))
    print(f"{family}: exported logits max rel. error {err:.1e}")
    assert err < 1e-5
    # the run's (imported) tokenizer went with it
    text = "To be, or not to be: that is the question."
    assert (AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False)
            == AutoTokenizer.from_pretrained(str(hf_dir)).encode(text, add_special_tokens=False))


def test_deepseek_v3_mtp_layer_round_trips(runs, tmp_path):
    """The MTP layer of a DeepSeek-V3 checkpoint: read into the MTP module (the import test
    above compares step_0 with the folder, MTP tensors included), trained (its weights move),
    exported back as model.layers.<n_layers>.* equal to the trained module, with the layer's
    copies of the embedding and head equal to the exported main ones; transformers loads the
    folder (ignoring that layer, as it does DeepSeek's)."""
    from transformers import AutoModelForCausalLM

    cfg, hf_dir, run_dir = runs[MTP_CASE]
    assert cfg.model.mtp.depth == 1
    n = cfg.model.n_layers
    mtp_names = {k for k in load_file(str(hf_dir / "model.safetensors"))
                 if k.startswith(f"model.layers.{n}.")}
    assert {f"model.layers.{n}.{w}" for w in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                              "shared_head.norm.weight")} <= mtp_names
    out = tmp_path / "export"
    run_python("-m", "moetrain.hf", "export", run_dir, out, check=True)
    exported = {}
    for f in sorted(set(json.loads((out / "model.safetensors.index.json").read_text())
                        ["weight_map"].values())):
        exported.update(load_file(str(out / f)))
    trained = load_model_state(run_dir / "checkpoints" / "step_2")
    start = load_model_state(run_dir / "checkpoints" / "step_0")
    assert not torch.equal(trained["mtp.0.eh_proj.weight"], start["mtp.0.eh_proj.weight"])
    want = to_hf_state(trained, cfg.model)
    assert {k for k in exported if k.startswith(f"model.layers.{n}.")} == mtp_names
    for name in mtp_names:
        assert torch.equal(exported[name], want[name]), name
    layer = f"model.layers.{n}."
    assert torch.equal(exported[layer + "embed_tokens.weight"],
                       exported["model.embed_tokens.weight"])
    assert torch.equal(exported[layer + "shared_head.head.weight"], exported["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
