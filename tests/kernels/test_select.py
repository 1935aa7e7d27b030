"""model.moe.kernels selection: auto | torch | triton, and the recorded-benchmark lookup."""

import json

import pytest
import torch

from moetrain.kernels import choose, permute, swiglu, unpermute
from moetrain.kernels.select import (
    OPS, SPEED_RECORD, auto_choice, check_setting, load_speed_record, recorded_speedup,
)
from tests.kernels.conftest import ON_GPU
from tests.kernels.routing_cases import make_routing

cpu_only = pytest.mark.skipif(ON_GPU, reason="the CPU side of the selection")


def entry(op="unpermute", device="NVIDIA H200", dtype="bf16", torch_ms=2.0, triton_ms=1.0):
    return {"op": op, "device": device, "dtype": dtype, "torch_ms": torch_ms,
            "triton_ms": triton_ms, "shape": {}}


def test_unknown_setting_names_the_key():
    with pytest.raises(ValueError, match=r"model\.moe\.kernels='fast': must be one of auto, torch, triton"):
        check_setting("fast")
    with pytest.raises(ValueError, match="unknown kernel op 'gemm'"):
        choose("torch", "gemm", torch.zeros(1))


def test_torch_is_always_torch():
    for op in OPS:
        assert choose("torch", op, torch.zeros(2, 2)) == "torch"


@cpu_only
def test_cpu_triton_needs_the_interpreter(monkeypatch):
    x = torch.zeros(2, 2)
    assert choose("triton", "permute", x) == "triton"  # TRITON_INTERPRET=1 (tests/conftest.py)
    assert choose("auto", "permute", x) == "torch"  # auto never picks the interpreter
    with pytest.raises(ValueError, match="cpu float16 tensor"):
        choose("triton", "swiglu", torch.zeros(2, 2, dtype=torch.float16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"model\.moe\.kernels=triton: .*cpu fp32.*TRITON_INTERPRET=1"):
        choose("triton", "permute", x)


@cpu_only
def test_torch_and_auto_run_the_reference_on_the_cpu(monkeypatch):
    from moetrain.kernels import triton_ops

    def fail(*args):
        raise AssertionError("the Triton path ran")

    for fn in ("Permute", "Unpermute", "SwiGLU"):
        monkeypatch.setattr(getattr(triton_ops, fn), "apply", fail)
    r = make_routing(5, 2, 4, "cpu")
    x = torch.randn(5, 8)
    for setting in ("auto", "torch"):
        rows = permute(x, r.row_map, setting)
        unpermute(rows, r.weight_TK, r.row_map, setting)
        swiglu(x, x, setting)
    with pytest.raises(AssertionError, match="Triton path ran"):
        permute(x, r.row_map, "triton")


def test_recorded_speedup_is_the_worst_shape():
    entries = [entry(torch_ms=3.0, triton_ms=1.0), entry(torch_ms=1.2, triton_ms=1.0),
               entry(op="swiglu", torch_ms=1.0, triton_ms=2.0), entry(device="NVIDIA H100 80GB HBM3")]
    assert recorded_speedup("unpermute", "NVIDIA H200", "bf16", entries) == pytest.approx(1.2)
    assert recorded_speedup("unpermute", "NVIDIA H200", "fp32", entries) is None
    assert auto_choice("unpermute", "NVIDIA H200", "bf16", entries) == "triton"
    assert auto_choice("swiglu", "NVIDIA H200", "bf16", entries) == "torch"  # slower
    assert auto_choice("permute", "NVIDIA H200", "bf16", entries) == "torch"  # not measured
    entries.append(entry(torch_ms=1.0, triton_ms=1.1))  # slower at one shape: not chosen
    assert auto_choice("unpermute", "NVIDIA H200", "bf16", entries) == "torch"


def test_the_shipped_record_is_well_formed():
    entries = load_speed_record()
    for e in entries:
        assert e["op"] in OPS and e["dtype"] in ("fp32", "bf16") and e["device"]
        assert e["torch_ms"] > 0 and e["triton_ms"] > 0 and isinstance(e["shape"], dict)
    measured = {(e["op"], e["device"], e["dtype"]) for e in entries}
    for op in OPS:  # nothing measured -> torch
        if (op, "NVIDIA H200", "bf16") not in measured:
            assert auto_choice(op, "NVIDIA H200", "bf16") == "torch"


def test_a_broken_record_is_refused(tmp_path):
    bad = tmp_path / "record.json"
    bad.write_text(json.dumps({"entries": {}}))
    with pytest.raises(ValueError, match="'entries' must be a list"):
        load_speed_record(bad)
    assert SPEED_RECORD.is_file()


def test_shapes_are_checked():
    r = make_routing(4, 2, 4, "cpu")
    with pytest.raises(ValueError, match=r"x_TD must be \[T, D\] with T = 4"):
        permute(torch.zeros(3, 8), r.row_map, "torch")
    with pytest.raises(ValueError, match=r"weight_TK must be \[T, k\]"):
        unpermute(torch.zeros(r.row_map.num_rows, 8), torch.zeros(4, 3), r.row_map, "torch")
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.zeros(2, 3), torch.zeros(2, 4), "torch")
