"""Model TFLOP/s and MFU: the planner's FLOPs at the step's top-k over a named peak."""

import pytest
import torch

from moetrain.config import compose, to_object
from moetrain.metrics.throughput import Peak, Throughput, device_peak, table_peak
from moetrain.planning import count_parameters


def test_datasheet_peaks_by_device_name_and_dtype():
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16").tflops == 989.4
    assert table_peak("NVIDIA H100 PCIe", "bf16").tflops == 756.0  # not the SXM's
    assert table_peak("NVIDIA A100-SXM4-80GB", "fp32").tflops == 19.5
    assert "datasheet" in table_peak("NVIDIA H200", "bf16").name
    assert table_peak("NVIDIA GeForce RTX 4090", "bf16") is None  # measured instead
    assert table_peak("NVIDIA B200", "fp32") is None


def test_cpu_peak_is_a_named_measured_ceiling():
    peak = device_peak(torch.device("cpu"), torch.float32)
    assert peak.tflops > 0 and "fp32 matmul ceiling" in peak.name and "measured" in peak.name


def test_model_tflops_and_mfu_from_the_planner_at_the_steps_top_k():
    model = to_object(compose(["+experiment=tiny"])).model
    t = Throughput(model, seq_len=128, world_size=2, peak=Peak(0.5, "test peak"))
    rec = t.record(tokens_per_s=1000.0, top_k=1)
    # by hand: 6 N_mm + 3 x 2 x layers x seq x heads x (qk + v) width per token (docs/planning.md)
    n_mm = count_parameters(model, top_k=1).n_active_matmul
    per_token = 6 * n_mm + 3 * 2 * 4 * 128 * 4 * (32 + 32)
    assert rec["model_tflops"] == pytest.approx(per_token * 1000.0 / 2 / 1e12, rel=1e-12)
    assert rec["mfu"] == pytest.approx(rec["model_tflops"] / 0.5, rel=1e-12)
    assert rec["peak_name"] == "test peak" and rec["peak_tflops"] == 0.5
    assert t.record(1000.0, top_k=2)["model_tflops"] > rec["model_tflops"]  # more experts active
