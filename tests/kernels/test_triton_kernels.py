"""The Triton kernels against the PyTorch path, forward and backward (autograd of the reference),
on ragged routings with empty experts, dropped assignments, capacity padding, zero tokens, in
fp32 and bf16. On the CPU they run through Triton's interpreter (conftest.py)."""

import pytest
import torch
import triton  # noqa: F401  (the tests must run, not skip: triton is in the dev extra)

from moetrain.kernels import permute, reference, swiglu, unpermute
from moetrain.model.moe.dispatcher import TokenDispatcher
from moetrain.model.moe.router import RouterOutput
from tests.kernels.conftest import DEVICE
from tests.kernels.routing_cases import make_routing

BF16_ULP = 2.0 ** -7  # one bf16 rounding (the interpreter truncates, a GPU rounds to nearest)


def assert_matches(out: torch.Tensor, ref32: torch.Tensor) -> None:
    """fp32: equal to fp32 rounding; bf16: one rounding away from the fp32 computation."""
    assert out.shape == ref32.shape and torch.isfinite(out).all()
    out32, ref32 = out.float(), ref32.float()
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    rel = 1e-5 if out.dtype == torch.float32 else BF16_ULP
    bound = rel * ref32.abs() + 1e-5 * scale
    worst = ((out32 - ref32).abs() - bound).max().item() if out.numel() else 0.0
    assert worst <= 0, f"exceeds the bound by {worst:.3g} (scale {scale:.3g})"


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(dtype or t.dtype).detach().requires_grad_(True)


def grads_of(fn, inputs, grad_out):
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [None if t.grad is None else t.grad.detach() for t in inputs]


CASES = [  # dtype, padded, small tiles
    pytest.param(torch.float32, False, True, id="fp32-small_tiles"),
    pytest.param(torch.bfloat16, True, True, id="bf16-padded-small_tiles"),
    pytest.param(torch.float32, True, False, id="fp32-padded-default_tiles"),
    pytest.param(torch.bfloat16, False, False, id="bf16-default_tiles"),
]


@pytest.mark.parametrize("dtype, padded, small", CASES)
def test_permute_forward_and_backward(dtype, padded, small, request):
    if small:
        request.getfixturevalue("small_tiles")
    T, K, E, D = 13, 3, 6, 40  # D not a multiple of the 16-column tile
    r = make_routing(T, K, E, DEVICE, padded=padded)
    x = torch.randn(T, D, device=DEVICE).to(dtype)
    g = torch.randn(r.row_map.num_rows, D, device=DEVICE).to(dtype)
    out, (gx,) = grads_of(lambda x: permute(x, r.row_map, "triton"), [leaf(x)], g)
    ref, (gx_ref,) = grads_of(lambda x: reference.permute(x, r.row_map), [leaf(x, torch.float32)],
                              g.float())
    assert out.dtype == dtype and torch.equal(out.float(), ref)  # a gather is exact
    assert_matches(gx, gx_ref)
    if padded:
        assert not out[r.row_map.slot_M < 0].any()  # padding rows are zero


@pytest.mark.parametrize("dtype, padded, small", CASES)
def test_unpermute_forward_and_backward(dtype, padded, small, request):
    if small:
        request.getfixturevalue("small_tiles")
    T, K, E, D = 13, 3, 6, 40
    r = make_routing(T, K, E, DEVICE, padded=padded)
    rows = torch.randn(r.row_map.num_rows, D, device=DEVICE).to(dtype)
    g = torch.randn(T, D, device=DEVICE).to(dtype)
    out, (g_rows, g_w) = grads_of(lambda rows, w: unpermute(rows, w, r.row_map, "triton"),
                                  [leaf(rows), leaf(r.weight_TK)], g)
    ref, (g_rows_ref, g_w_ref) = grads_of(lambda rows, w: reference.unpermute(rows, w, r.row_map),
                                          [leaf(rows, torch.float32), leaf(r.weight_TK)], g.float())
    assert out.dtype == dtype and g_rows.dtype == dtype and g_w.dtype == torch.float32
    assert_matches(out, ref)
    assert_matches(g_rows, g_rows_ref)
    assert_matches(g_w, g_w_ref)  # fp32 dot products of the same values
    dropped = r.row_map.pos_TK < 0
    assert dropped.any() and not g_w[dropped].any()
    if padded:
        assert not g_rows[r.row_map.slot_M < 0].any()


@pytest.mark.parametrize("dtype, small", [(torch.float32, True), (torch.bfloat16, False)])
def test_swiglu_forward_and_backward_on_strided_halves(dtype, small, request):
    if small:
        request.getfixturevalue("small_tiles")
    N, F = 11, 37
    ab = torch.randn(N, 2 * F, device=DEVICE).to(dtype) * 3  # one [N, 2F] GEMM output
    g = torch.randn(N, F, device=DEVICE).to(dtype)
    ab_leaf = leaf(ab)
    out = swiglu(ab_leaf[:, :F], ab_leaf[:, F:], "triton")  # row-strided views, no copy
    out.backward(g)
    ab_ref = leaf(ab, torch.float32)
    ref = reference.swiglu(ab_ref[:, :F], ab_ref[:, F:])
    ref.backward(g.float())
    assert out.dtype == dtype
    assert_matches(out.detach(), ref.detach())
    assert_matches(ab_leaf.grad[:, :F], ab_ref.grad[:, :F])
    assert_matches(ab_leaf.grad[:, F:], ab_ref.grad[:, F:])


def test_unpermute_gradient_to_weights_only_or_rows_only():
    T, K, D = 9, 2, 24
    r = make_routing(T, K, 5, DEVICE)
    rows = torch.randn(r.row_map.num_rows, D, device=DEVICE)
    g = torch.randn(T, D, device=DEVICE)
    _, (g_rows_ref, g_w_ref) = grads_of(lambda a, w: reference.unpermute(a, w, r.row_map),
                                        [leaf(rows), leaf(r.weight_TK)], g)
    w_only = leaf(r.weight_TK)
    unpermute(rows, w_only, r.row_map, "triton").backward(g)
    assert_matches(w_only.grad, g_w_ref)
    rows_only = leaf(rows)
    unpermute(rows_only, r.weight_TK, r.row_map, "triton").backward(g)
    assert_matches(rows_only.grad, g_rows_ref)


def test_no_tokens_and_everything_dropped(small_tiles):
    D = 8
    for T, drop, padded in ((0, 0.0, False), (0, 0.0, True), (5, 1.0, False), (5, 1.0, True)):
        r = make_routing(T, 2, 4, DEVICE, drop=drop, padded=padded)
        x = leaf(torch.randn(T, D, device=DEVICE))
        x_MD = permute(x, r.row_map, "triton")
        assert x_MD.shape == (r.row_map.num_rows, D) and not x_MD.any()
        rows = leaf(torch.randn(r.row_map.num_rows, D, device=DEVICE))
        w = leaf(r.weight_TK)
        y = unpermute(rows, w, r.row_map, "triton")
        assert y.shape == (T, D) and not y.any()
        (y.sum() + x_MD.sum()).backward()
        assert not x.grad.any() and not w.grad.any() and not rows.grad.any()
    a = leaf(torch.randn(0, 6, device=DEVICE))
    h = swiglu(a, a, "triton")
    h.sum().backward()
    assert h.shape == (0, 6) and a.grad.shape == (0, 6)


def test_results_are_bitwise_repeatable(small_tiles):
    """No atomics: the same inputs give the same bits, forward and backward."""
    T, K, D = 16, 4, 40
    r = make_routing(T, K, 8, DEVICE, drop=0.1)
    x = torch.randn(T, D, device=DEVICE).to(torch.bfloat16)
    g = torch.randn(T, D, device=DEVICE).to(torch.bfloat16)

    def run():
        xl, wl = leaf(x), leaf(r.weight_TK)
        y = unpermute(permute(xl, r.row_map, "triton") * 2, wl, r.row_map, "triton")
        y.backward(g)
        return y, xl.grad, wl.grad

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("padded", [False, True])
def test_the_local_dispatcher_on_either_path(padded):
    """moetrain's dispatcher gives the same rows, combine and gradients on the Triton and the
    PyTorch path (model.moe.kernels), with drops and with capacity padding (fp32)."""
    T, K, E, D = 10, 2, 5, 24
    x = torch.randn(T, D, device=DEVICE)
    idx = torch.rand(T, E, device=DEVICE).topk(K, dim=1).indices
    w = torch.rand(T, K, device=DEVICE)
    keep = torch.rand(T, K, device=DEVICE) > 0.25
    capacity = T if padded else None
    g = torch.randn(T, D, device=DEVICE)
    out = {}
    for kernels in ("torch", "triton"):
        xl, wl = leaf(x), leaf(w)
        routing = RouterOutput(wl, wl, wl, idx, keep, capacity)
        disp = TokenDispatcher(E, pad_to_capacity=padded, kernels=kernels)
        x_ND, _, handle = disp.permute(xl, routing)
        y = disp.unpermute(x_ND * 2.0, handle)
        y.backward(g)
        out[kernels] = (x_ND.detach(), y.detach(), xl.grad, wl.grad)
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


SIZE = (8192, 8, 64, 2048, 1024)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_olmoe_sized_layer_on_the_gpu():
    """Default tiles, int64 offsets and many programs at a real size (OLMoE: 8192 tokens, top-8
    of 64 experts, d 2048, f 1024), bf16, compiled; repeatable bit for bit."""
    T, K, E, D, F = SIZE
    r = make_routing(T, K, E, DEVICE, drop=0.05, empty=(3, E - 1))
    x = torch.randn(T, D, device=DEVICE).to(torch.bfloat16)
    g = torch.randn(T, D, device=DEVICE).to(torch.bfloat16)
    gate = torch.randn(r.row_map.num_rows, F, device=DEVICE).to(torch.bfloat16)

    def layer(x, w, kernels):
        rows = permute(x, r.row_map, kernels)
        h = swiglu(rows[:, :F] * 2, gate.to(rows.dtype), kernels)  # a row-strided view
        return unpermute(rows + torch.cat([h, h], dim=1), w, r.row_map, kernels)

    results = []
    for _ in range(2):
        xl, wl = leaf(x), leaf(r.weight_TK)
        y = layer(xl, wl, "triton")
        y.backward(g)
        results.append((y.detach(), xl.grad, wl.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    xr, wr = leaf(x, torch.float32), leaf(r.weight_TK)
    ref = layer(xr, wr, "torch")
    ref.backward(g.float())
    y, gx, gw = results[0]
    for got, want in ((y, ref.detach()), (gx, xr.grad), (gw, wr.grad)):
        err = torch.linalg.vector_norm(got.float() - want) / torch.linalg.vector_norm(want)
        assert err < 1e-2
