"""The reference itself: independent of the code it checks, and right on hand-computed values."""

import ast
import math
from pathlib import Path

import torch

from moetrain.config.schema import LBLConfig, MoEConfig, OptimConfig, ValueSchedule
from tests.oracle import reference as ref


def test_the_reference_imports_nothing_from_moetrain_but_the_config_schema():
    tree = ast.parse(Path(ref.__file__).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    assert {m for m in modules if m.startswith("moetrain")} == {"moetrain.config.schema"}


def test_lr_and_schedules_on_hand_values():
    optim = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, decay="cosine")
    assert [ref.lr_at(s, optim, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(ref.lr_at(9, optim, 14), 0.55)
    assert math.isclose(ref.lr_at(20, optim, 14), 0.1)
    ramp = MoEConfig(num_experts=8, top_k=1)
    ramp.schedule.top_k = ValueSchedule(kind="linear", start=1, end=2, end_step=2)
    assert [ref.top_k_at(ramp, s) for s in range(3)] == [1, 2, 2]  # 1.5 rounds up
    steps = MoEConfig(capacity_factor=None)
    steps.schedule.capacity_factor = ValueSchedule(kind="step", milestones=[[3, 1.25]])
    assert [ref.capacity_factor_at(steps, s) for s in (0, 2, 3, 9)] == [None, None, 1.25, 1.25]


def test_a_uniform_router_has_lbl_one_and_z_log_n_squared():
    """Zero router weights: every score 1/N, any selection gives f summing to one, so
    LBL = N * sum_i f_i / N = 1 and z = log(N)^2; with norm_topk_prob each weight is 1/k."""
    moe = MoEConfig(num_experts=4, top_k=2, lbl=LBLConfig(scope="micro"))
    D, F = 8, 4
    w = {"router": torch.zeros(4, D), "w1": torch.randn(4, D, F), "w3": torch.randn(4, D, F),
         "w2": torch.randn(4, F, D)}
    x = torch.randn(2, 3, D)
    out = ref.moe_forward(x, w, torch.zeros(4), moe, 2, None, None)
    assert math.isclose(float(out.lbl), 1.0, rel_tol=1e-6)
    assert math.isclose(float(out.z), math.log(4) ** 2, rel_tol=1e-6)
    assert int(out.slot_counts.sum()) == 12 and out.kept == 12 and out.tokens == 6
    idx = torch.zeros(4).expand(6, 4).topk(2, dim=-1).indices  # the same ties torch.topk breaks
    want = sum(0.5 * ref.swiglu(x.reshape(6, D), w["w1"][e], w["w3"][e], w["w2"][e])
               * (idx == e).any(-1, keepdim=True) for e in range(4))
    torch.testing.assert_close(out.y.reshape(6, D), want)
