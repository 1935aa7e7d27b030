"""Checkpoint tools: inspect and convert, with every expert surviving a round trip bit-exactly."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from moetrain.checkpoint import CheckpointError, CheckpointManager, TrainState
from moetrain.checkpoint.convert import from_hf, inspect, load_model_state, to_hf
from moetrain.model import Transformer
from tests.harness import run_python, tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny MoE (shared experts too) with distinct random weights, saved as a DCP checkpoint."""
    cfg = tiny_config(["model.moe.num_shared_experts=1"])
    torch.manual_seed(3)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path_factory.mktemp("run")
    path = CheckpointManager(run, None).save(model, opt, TrainState(step=7), meta={"world_size": 1})
    return model, path, cfg


def test_inspect_reports_step_shapes_and_experts(saved):
    model, path, cfg = saved
    info = inspect(path)
    assert info["step"] == 7 and info["moe_layers"] == 3 and info["experts_per_layer"] == [8]
    assert info["model_numel"] == sum(t.numel() for t in model.state_dict().values())
    assert info["tensors"]["layers.1.moe.experts.w1"] == {"shape": [8, 128, 192], "dtype": "float32"}
    assert info["tensors"]["layers.1.moe.router.expert_bias"] == {"shape": [8], "dtype": "float32"}
    assert info["total_bytes"] > info["model_numel"] * 4  # model + optimizer state


def test_hf_round_trip_keeps_every_expert_bit_exact(saved):
    model, path, cfg = saved
    state = load_model_state(path)
    assert state.keys() == model.state_dict().keys()
    hf = to_hf(state)
    experts = [k for k in hf if ".mlp.experts." in k]
    assert len(experts) == 3 * 8 * 3  # MoE layers x experts x (gate, up, down)
    assert hf["model.layers.2.mlp.experts.5.down_proj.weight"].shape == (128, 192)
    assert hf["model.layers.2.mlp.gate.e_score_correction_bias"].shape == (8,)
    assert torch.equal(hf["model.layers.2.mlp.experts.5.gate_proj.weight"],
                       model.layers["2"].moe.experts.w1[5].t())
    back = from_hf(hf)
    assert back.keys() == state.keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_a_missing_expert_or_unknown_tensor_is_an_error(saved):
    hf = to_hf(load_model_state(saved[1]))
    del hf["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layer 1: up_proj of experts \[3\] is missing"):
        from_hf(hf)
    with pytest.raises(CheckpointError, match="mystery"):
        to_hf({"mystery.weight": torch.zeros(1)})


def test_the_scripts_convert_to_safetensors_and_back(saved, tmp_path):
    model, path, _ = saved
    out = run_python("scripts/convert_checkpoint.py", path.parent.parent, "--to", "safetensors",
                     tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "hf" / "moetrain.json").read_text())["step"] == 7
    # The summary counts what the file holds (every expert its own tensor), and the file gets
    # the mode any new file gets under the umask (safetensors alone writes 0600).
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    params = sum(t.numel() for t in written.values())
    assert f"({len(written)} tensors, {params:,} parameters)" in out.stdout, out.stdout
    assert len(written) == len(to_hf(model.state_dict())) > len(model.state_dict())
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "moetrain.json"):
        assert stat.S_IMODE((tmp_path / "hf" / name).stat().st_mode) == 0o666 & ~umask, name
    out = run_python("scripts/convert_checkpoint.py", tmp_path / "hf", "--from-safetensors", "--to",
                     "torch", tmp_path / "model.pt")
    assert out.returncode == 0, out.stderr
    back = torch.load(tmp_path / "model.pt")
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key
    out = run_python("scripts/inspect_checkpoint.py", str(path))
    assert out.returncode == 0 and "step         7" in out.stdout and "layers.1.moe.experts.w2" in out.stdout
    out = run_python("scripts/inspect_checkpoint.py", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "nothing" in out.stderr
