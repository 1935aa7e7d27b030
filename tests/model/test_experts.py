import pytest
import torch

from moetrain.model.moe import experts as experts_mod
from moetrain.model.moe.experts import GroupedExperts, experts_grouped, experts_loop


def make_experts(E=4, D=16, F=32):
    ex = GroupedExperts(E, D, F)
    for w in ex.parameters():
        torch.nn.init.normal_(w, std=0.2)
    return ex


def naive_rows(ex, x, expert_of_row):
    rows = []
    for n in range(x.shape[0]):
        e = int(expert_of_row[n])
        h = torch.nn.functional.silu(x[n] @ ex.w1[e]) * (x[n] @ ex.w3[e])
        rows.append(h @ ex.w2[e])
    return torch.stack(rows)


@pytest.mark.skipif(experts_mod._grouped_mm is None, reason="no grouped_mm in this torch")
def test_grouped_equals_loop_values_and_grads():
    ex = make_experts()
    counts = torch.tensor([5, 0, 7, 3])  # includes an expert with no tokens
    x = torch.randn(int(counts.sum()), 16)
    upstream = torch.randn(16, x.shape[0]).T  # non-contiguous, like a transpose's gradient
    results = []
    for fn in (experts_grouped, experts_loop):
        xi = x.clone().requires_grad_()
        ex.zero_grad()
        out = fn(xi, counts, ex.w1, ex.w3, ex.w2)
        out.backward(upstream)
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in ex.parameters()]))
    (o1, gx1, gw1), (o2, gx2, gw2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-6, atol=1e-6)
    for a, b in zip(gw1, gw2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(gw1[0][1], torch.zeros(16, 32))  # the idle expert gets no gradient


def test_loop_matches_per_row_reference():
    ex = make_experts()
    counts = torch.tensor([2, 1, 0, 3])
    x = torch.randn(6, 16)
    out = experts_loop(x, counts, ex.w1, ex.w3, ex.w2)
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    torch.testing.assert_close(out, naive_rows(ex, x, expert_of_row))


@pytest.mark.parametrize("use_grouped_mm", [None, False])
def test_module_handles_no_tokens(use_grouped_mm):
    ex = make_experts()
    ex.use_grouped_mm = use_grouped_mm
    out = ex(torch.zeros(0, 16), torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 16)


def test_default_uses_grouped_mm_on_cpu_fp32():
    if experts_mod._grouped_mm is None:
        pytest.skip("no grouped_mm in this torch")
    ex = make_experts()
    assert experts_mod.grouped_mm_usable(torch.randn(3, 16), ex.w1, ex.w3, ex.w2)
    # a width whose rows are not 16-byte aligned falls back to the loop (and still works)
    odd = make_experts(D=16, F=30)
    assert not experts_mod.grouped_mm_usable(torch.randn(3, 16), odd.w1, odd.w3, odd.w2)
    counts = torch.tensor([1, 1, 0, 1])
    x = torch.randn(3, 16)
    torch.testing.assert_close(odd(x, counts), experts_loop(x, counts, odd.w1, odd.w3, odd.w2))


def test_hidden_column_blocks_sum_to_the_whole_experts_output():
    """What expert tensor parallelism relies on: experts holding hidden columns [0, F/2) and
    [F/2, F) of experts 2 and 3 give partial outputs that sum to those experts' outputs."""
    full = make_experts(E=4, D=16, F=32)
    halves = [make_experts(E=2, D=16, F=16) for _ in range(2)]
    with torch.no_grad():
        for h, cols in zip(halves, (slice(0, 16), slice(16, 32))):
            h.w1.copy_(full.w1[2:, :, cols])
            h.w3.copy_(full.w3[2:, :, cols])
            h.w2.copy_(full.w2[2:, cols, :])
    counts = torch.tensor([3, 2])
    x = torch.randn(5, 16)
    expected = experts_loop(x, torch.tensor([0, 0, 3, 2]), full.w1, full.w3, full.w2)
    torch.testing.assert_close(halves[0](x, counts) + halves[1](x, counts), expected,
                               rtol=1e-5, atol=1e-5)


def test_first_forward_inside_activation_checkpointing(monkeypatch):
    """The grouped_mm probe runs on the first forward; inside a checkpointed region it must not
    change what the forward saves (the recompute finds the probe cached)."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(experts_mod, "_probe_results", {})  # a fresh process: nothing probed
    ex = make_experts()
    counts = torch.tensor([5, 0, 7, 3])
    x = torch.randn(15, 16, requires_grad=True)
    checkpoint(ex, x, counts, use_reentrant=False).square().sum().backward()
    assert x.grad is not None and ex.w1.grad is not None
