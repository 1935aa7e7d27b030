import importlib.util

import pytest

from moetrain.config import ConfigError, compose, to_object, validate
from moetrain.parallel import LayoutError, check_layout


def config(*overrides):
    return to_object(compose(["+experiment=tiny", *overrides]))


@pytest.mark.parametrize("experiment", ["tiny", "mixtral_8x7b", "olmoe_1b_7b", "qwen3_30b_a3b",
                                        "deepseek_v2_lite", "deepseek_v3", "kimi_k2",
                                        "qwen3_235b_a22b"])
def test_every_shipped_experiment_is_valid(experiment):
    cfg = to_object(compose([f"+experiment={experiment}"]))
    validate(cfg)
    assert cfg.run.name == experiment


@pytest.mark.parametrize("world, layout", [
    (8, ["parallel.tp=4", "parallel.ep=4"]), (8, ["parallel.cp=4", "parallel.ep=2"]),
    (8, ["parallel.pp=4", "parallel.tp=2"]),
    (8, ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved"]),
    (4, ["parallel.tp=2", "parallel.cp=2", "parallel.ep=4"]), (8, ["parallel.ep=8"]) ,
])
def test_the_tiny_experiment_fits_every_small_layout(world, layout):
    cfg = config(*layout)
    validate(cfg)
    check_layout(cfg, world)


@pytest.mark.parametrize("override, key", [
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("model.moe.top_k=0", "model.moe.top_k"),
    ("model.moe.capacity_factor=-1", "model.moe.capacity_factor"),
    ("model.moe.pad_to_capacity=true", "model.moe.pad_to_capacity"),
    ("optim.lr=0", "optim.lr"),
    ("optim.beta2=1.5", "optim.beta2"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.eval_capacity_factor=0", "train.eval_capacity_factor"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("data.val_fraction=0.7", "data.val_fraction"),
    ("model.moe.routing.top_p=1.5", "model.moe.routing.top_p"),
    ("model.moe.routing.num_null_experts=-1", "model.moe.routing.num_null_experts"),
    ("model.moe.routing.bias_rate=-1", "model.moe.routing.bias_rate"),
    ("optim.qk_clip_threshold=0", "optim.qk_clip_threshold"),
    ("optim.qk_clip_threshold=-3", "optim.qk_clip_threshold"),
    ("optim.momentum=1", "optim.momentum"),
    ("optim.ns_steps=0", "optim.ns_steps"),
    ("model.moe.ep_budget=0", "model.moe.ep_budget"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(config(override))
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("model.moe.score_func=relu", "model.moe.score_func"),
    ("train.dtype=fp8", "train.dtype"),
    ("parallel.pp_schedule=magic", "parallel.pp_schedule"),
    ("model.moe.routing.group_mode=clustered", "model.moe.routing.group_mode"),
    ("model.moe.lbl.scope=batch", "model.moe.lbl.scope"),
    ("train.recompute=some", "train.recompute"),
    ("optim.name=lion", "optim.name"),
    ("optim.ns_dtype=fp16", "optim.ns_dtype"),
])
def test_values_outside_a_choice_list_are_refused_while_composing(override, key):
    with pytest.raises(ConfigError) as err:
        config(override)
    assert str(err.value).startswith(key) and "expected one of" in str(err.value)
    assert "\n" not in str(err.value)


def test_choices_of_a_config_built_in_python_are_checked():
    cfg = config()
    cfg.model.moe.score_func = "relu"
    with pytest.raises(ConfigError, match="model.moe.score_func='relu' is invalid: must be one of "
                                          "softmax, sigmoid"):
        validate(cfg)


@pytest.mark.parametrize("override", ["model.moe.ep_budget=1.5", "model.moe.ep_overlap=true"])
def test_expert_parallel_exchange_settings_without_expert_parallelism_are_refused(override):
    key = override.split("=")[0]
    cfg = config(override)
    validate(cfg)
    with pytest.raises(LayoutError, match=rf"^{key} = .* needs expert parallelism "
                                          r"\(parallel.ep > 1\)") as err:
        check_layout(cfg, 2)
    assert err.value.keys == (key, "parallel.ep") and "\n" not in str(err.value)
    check_layout(config(override, "parallel.ep=2"), 2)


def test_layout_errors_name_the_keys_for_the_world_size():
    with pytest.raises(LayoutError, match="model.moe.num_experts.*parallel.ep"):
        check_layout(config("parallel.ep=3"), 3)
    with pytest.raises(LayoutError, match="parallel.cp"):  # cp = 2 does not divide one rank
        check_layout(config("parallel.cp=2"), 1)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_enabled_without_wandb_installed_is_refused():
    with pytest.raises(ConfigError, match="logging.wandb.enabled"):
        validate(config("logging.wandb.enabled=true"))


@pytest.mark.parametrize("override", ["train.max_step=3", "model.moe.topk=1", "train.max_steps=many"])
def test_unknown_keys_and_wrong_types_are_refused_while_composing(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        config(override)


def test_balanced_groups_must_divide_top_k():
    with pytest.raises(ConfigError, match="model.moe.routing.num_groups.*model.moe.top_k=2"):
        validate(config("model.moe.routing.group_mode=balanced", "model.moe.routing.num_groups=4"))


@pytest.mark.parametrize("overrides, key, why", [
    # a named family refuses what its Hugging Face model cannot compute
    (["model.family=mixtral"], "model.moe.first_dense_layers", "must be 0"),
    (["model.family=qwen3_moe"], "model.qk_norm", "must be head"),
    (["+experiment=olmoe_1b_7b", "model.qk_norm=head"], "model.qk_norm", "must be full"),
    (["+experiment=qwen3_30b_a3b", "model.moe.routing.bias_rate=0.001"],
     "model.moe.routing.bias_rate", "no expert bias"),
    (["+experiment=qwen3_30b_a3b", "model.moe.routing.num_null_experts=2"],
     "model.moe.routing.num_null_experts", "must be 0"),
    (["+experiment=deepseek_v2_lite", "model.moe.norm_topk_prob=true"],
     "model.moe.norm_topk_prob", "never renormalises"),
    (["+experiment=deepseek_v2_lite", "model.moe.score_func=sigmoid"], "model.moe.score_func",
     "must be softmax"),
    # multi-head latent attention and YaRN
    (["model.attention=mla"], "model.n_kv_heads", "must equal model.n_heads"),
    (["+experiment=deepseek_v2_lite", "model.mla.qk_rope_head_dim=63"],
     "model.mla.qk_rope_head_dim", "even"),
    (["model.rope_scaling.kind=yarn", "model.rope_scaling.factor=0.5"],
     "model.rope_scaling.factor", ">= 1"),
    (["model.moe.shared_expert_gate=true"], "model.moe.shared_expert_gate", "num_shared_experts"),
])
def test_family_and_architecture_values_name_their_key(overrides, key, why):
    first = [] if overrides[0].startswith("+experiment") else ["+experiment=tiny"]
    with pytest.raises(ConfigError) as err:
        validate(to_object(compose(first + overrides)))
    msg = str(err.value)
    assert msg.startswith(key) and why in msg and "\n" not in msg


def test_from_hf_needs_a_folder_and_a_named_family(tmp_path):
    with pytest.raises(ConfigError, match="model.init.from_hf=.*config.json"):
        validate(config(f"model.init.from_hf={tmp_path}"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model.family='custom' is invalid: must name"):
        validate(config(f"model.init.from_hf={tmp_path}"))


def test_qk_clip_is_refused_with_qk_norms():
    """The q/k norms undo a scaling of the projections: QK-clip would silently do nothing."""
    with pytest.raises(ConfigError, match="optim.qk_clip_threshold.*model.qk_norm=none"):
        validate(config("optim=muon", "optim.qk_clip_threshold=100", "model.qk_norm=head"))
    validate(config("optim=muon", "optim.qk_clip_threshold=100"))


def test_the_muon_group_selects_muon_with_its_defaults():
    o = config("optim=muon").optim
    assert (o.name, o.momentum, o.nesterov, o.ns_steps, o.ns_dtype, o.qk_clip_threshold) == (
        "muon", 0.95, True, 5, "bf16", None)
    assert config().optim.name == "adamw"
