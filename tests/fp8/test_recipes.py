"""Each FP8 recipe of moetrain, on one linear and one grouped GEMM, against a reference written
here from the recipe's definition (docs/fp8.md, "Recipes"): every operand of every GEMM (the
forward, the input gradient, the weight gradient) quantized to float8 and dequantized with plain
PyTorch, then multiplied in fp64. No torchao code is used by the reference.

    tensorwise  scale = 448 / amax of the whole tensor (e4m3); the output gradient in e5m2
                (57344 / amax); no rounding of the scale
    rowwise     e4m3, one scale per row along the GEMM's reduction dimension, rounded down to a
                power of two: 2^floor(log2(448 / amax))
    mxfp8       e4m3, one scale per 32 consecutive elements along the reduction dimension:
                2^ceil(log2(amax / 448)) (OCP MX, RCEIL)

The routed experts of tensorwise use the rowwise grouped GEMM (torchao has no per-tensor one);
their weight gradient is scaled per (expert, column) over that expert's rows (tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.fp8 import require_torchao

require_torchao()

from moetrain.fp8 import FP8Plan, apply_fp8  # noqa: E402
from moetrain.fp8.grouped import grouped_gemm  # noqa: E402
from moetrain.fp8.linear import convert_linears  # noqa: E402
from moetrain.model.moe.experts import GroupedExperts, experts_loop  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MAX = {E4M3: 448.0, E5M2: 57344.0}
RECIPES = ("tensorwise", "rowwise", "mxfp8")


# -- the reference quantizers (from the definitions above) ---------------------------------------

def _cast(scaled: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """Saturate to the format's range and round to it (round to nearest even), back to fp64."""
    return scaled.clamp(-MAX[fmt], MAX[fmt]).to(fmt).double()


def q_tensor(t: torch.Tensor, fmt: torch.dtype = E4M3) -> torch.Tensor:
    """One scale for the whole tensor: 448 / amax (computed in fp64, stored as fp32)."""
    scale = (MAX[fmt] / t.double().abs().max()).float().double()
    return _cast(t.double() * scale, fmt) / scale


def q_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """One power-of-two scale per slice along `dim`: 2^floor(log2(448 / amax)), amax over dim."""
    amax = t.double().abs().amax(dim=dim, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(MAX[E4M3] / amax)))
    return _cast(t.double() * scale, E4M3) / scale


def q_blocks(t: torch.Tensor, dim: int, block: int = 32) -> torch.Tensor:
    """One power-of-two scale per `block` consecutive elements along `dim`:
    2^ceil(log2(amax / 448))."""
    moved = t.double().movedim(dim, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax / MAX[E4M3])))
    deq = _cast(blocks / scale, E4M3) * scale
    return deq.reshape(moved.shape).movedim(-1, dim)


class Product:
    """a @ b of dequantized operands in fp64, with |a| @ |b|: the scale an fp32 or bf16 GEMM's
    rounding error is bounded by (element by element, whatever the cancellation)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.value, self.scale = a @ b, a.abs() @ b.abs()

    @staticmethod
    def cat(parts: list["Product"]) -> "Product":
        out = Product.__new__(Product)
        out.value = torch.cat([p.value for p in parts])
        out.scale = torch.cat([p.scale for p in parts])
        return out

    @staticmethod
    def stack(parts: list["Product"]) -> "Product":
        out = Product.__new__(Product)
        out.value = torch.stack([p.value for p in parts])
        out.scale = torch.stack([p.scale for p in parts])
        return out


def reference_linear(recipe: str, x_MK, w_NK, dy_MN) -> tuple[Product, Product, Product]:
    """y = x w^T, dx = dy w, dw = dy^T x with the recipe's operands (module docstring)."""
    if recipe == "tensorwise":
        xq, wq, dyq = q_tensor(x_MK), q_tensor(w_NK), q_tensor(dy_MN, E5M2)
        return Product(xq, wq.T), Product(dyq, wq), Product(dyq.T, xq)
    q = q_rows if recipe == "rowwise" else q_blocks
    return (Product(q(x_MK, 1), q(w_NK, 1).T),     # reduction over K
            Product(q(dy_MN, 1), q(w_NK, 0)),      # reduction over N
            Product(q(dy_MN, 0).T, q(x_MK, 0)))    # reduction over the tokens M


def reference_grouped(recipe: str, x_NK, w_EKO, dy_NO, counts: list[int]):
    """Per expert e (rows of its group): y = x w[e], dx = dy w[e]^T, dw[e] = x^T dy."""
    q = q_blocks if recipe == "mxfp8" else q_rows
    ys, dxs, dws, start = [], [], [], 0
    for e, n in enumerate(counts):
        x, dy, w = x_NK[start:start + n], dy_NO[start:start + n], w_EKO[e]
        start += n
        ys.append(Product(q(x, 1), q(w, 0)))         # reduction over K: w per column
        dxs.append(Product(q(dy, 1), q(w, 1).T))     # reduction over O: w per row
        if n:
            dws.append(Product(q(x, 0).T, q(dy, 0)))  # reduction over the expert's rows
        else:
            dws.append(_zero_product(w.shape))
    return Product.cat(ys), Product.cat(dxs), Product.stack(dws)


def _zero_product(shape) -> Product:
    out = Product.__new__(Product)
    out.value = out.scale = torch.zeros(shape, dtype=torch.float64)
    return out


# -- inputs --------------------------------------------------------------------------------------
# "outliers": random, rows and columns of different magnitudes and one outlier (where a scale's
# granularity and the saturation matter). "blocks": 32-element blocks of magnitudes 2^16 apart
# along every dimension a GEMM reduces over, the two operands of each GEMM complementary, so
# every product term counts: per-row scales then push whole blocks into e4m3's subnormals, per-
# block scales do not (with power-of-two scales, rowwise and MXFP8 differ nowhere else).

def _outliers(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    rows = torch.exp2(torch.randint(-4, 5, (shape[-2], 1), generator=g).float())
    cols = torch.exp2(torch.randint(-2, 3, (shape[-1],), generator=g).float())
    t = t * rows * cols
    t.view(-1)[7] = 20.0 * t.abs().max()
    return t


def _blocks(*shape_and_signs: tuple[int, int], seed: int) -> torch.Tensor:
    """randn * 2^(16 * sum_d sign_d * (index_d // 32 odd)) for ((size_d, sign_d), ...)."""
    shape = [n for n, _ in shape_and_signs]
    g = torch.Generator().manual_seed(seed)
    exponent = torch.zeros(shape)
    for d, (n, sign) in enumerate(shape_and_signs):
        odd = ((torch.arange(n) // 32) % 2).float() * 16 * sign
        exponent = exponent + odd.view([n if i == d else 1 for i in range(len(shape))])
    return torch.randn(*shape, generator=g) * torch.exp2(exponent)


def linear_inputs(kind: str, M: int, K: int, N: int):
    """x [M, K], w [N, K], dy [M, N]."""
    if kind == "outliers":
        return _outliers(M, K, seed=2), _outliers(N, K, seed=1), _outliers(M, N, seed=3)
    return (_blocks((M, 1), (K, -1), seed=2), _blocks((N, 1), (K, 1), seed=1),
            _blocks((M, -1), (N, -1), seed=3))


def grouped_inputs(kind: str, N: int, E: int, K: int, O: int):
    """x [N, K], w [E, K, O], dy [N, O]."""
    if kind == "outliers":
        return _outliers(N, K, seed=4), _outliers(E, K, O, seed=5), _outliers(N, O, seed=6)
    return (_blocks((N, 1), (K, -1), seed=4), _blocks((E, 0), (K, 1), (O, 1), seed=5),
            _blocks((N, -1), (O, -1), seed=6))


def _close(got: torch.Tensor, want: Product, rtol: float, what: str) -> None:
    """|got - want| <= rtol * (|a| @ |b|) element by element (plus fp32's smallest normal)."""
    err = (got.double() - want.value).abs()
    bad = err > rtol * want.scale + 1e-38
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst "
                           f"{(err / want.scale.clamp_min(1e-300)).max():.3g} of |a| @ |b|")


# fp32 GEMMs on the dequantized operands agree with the fp64 reference to fp32 rounding.
RTOL = {"tensorwise": 1e-5, "rowwise": 1e-5, "mxfp8": 1e-5}
KINDS = ("outliers", "blocks")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_matches_the_recipe(recipe, kind):
    M, K, N = 64, 96, 64
    x, w, dy = linear_inputs(kind, M, K, N)
    model = nn.Sequential(nn.Linear(K, N, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    assert convert_linears(model, FP8Plan(recipe)) == ["0"]
    assert type(model[0]) is not nn.Linear
    x.requires_grad_()
    y = model(x)
    y.backward(dy)
    want_y, want_dx, want_dw = reference_linear(recipe, x.detach(), w, dy)
    _close(y, want_y, RTOL[recipe], "output")
    _close(x.grad, want_dx, RTOL[recipe], "input gradient")
    _close(model[0].weight.grad, want_dw, RTOL[recipe], "weight gradient")
    # and FP8 is not high precision: the quantization shows against the exact product
    exact = x.detach().double() @ w.double().T
    assert ((y.double() - exact).abs() / exact.abs()).median() > 1e-3


def _grouped_case(recipe: str, kind: str):
    gemm = grouped_gemm(FP8Plan(recipe))
    m = gemm.group_multiple
    counts = [2 * m, 0, m, 3 * m]  # aligned groups (the experts pad them), one empty expert
    x, w, dy = grouped_inputs(kind, sum(counts), len(counts), 64, 96)
    return gemm, counts, x, w, dy


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_grouped_gemm_matches_the_recipe(recipe, kind):
    gemm, counts, x, w, dy = _grouped_case(recipe, kind)
    x.requires_grad_()
    w.requires_grad_()
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = gemm(x, w, offsets)
    y.backward(dy)
    want_y, want_dx, want_dw = reference_grouped(recipe, x.detach(), w.detach(), dy, counts)
    _close(y, want_y, RTOL[recipe], "output")
    _close(x.grad, want_dx, RTOL[recipe], "input gradient")
    _close(w.grad, want_dw, RTOL[recipe], "weight gradient")


def test_the_references_tell_the_recipes_apart():
    """The comparisons above could fail: with the "blocks" inputs each recipe's reference is
    off the others' (and each GEMM of each) by far more than the tolerances, and with
    "outliers" tensorwise is off the power-of-two recipes."""
    for kind in KINDS:
        x, w, dy = linear_inputs(kind, 64, 96, 64)
        outs = {r: reference_linear(r, x, w, dy) for r in RECIPES}
        pairs = [(a, b) for a in RECIPES for b in RECIPES if a < b]
        for a, b in pairs:
            if kind == "outliers" and "tensorwise" not in (a, b):
                continue
            for got, want in zip(outs[a], outs[b]):
                with pytest.raises(AssertionError):
                    _close(got.value, want, max(RTOL[a], RTOL[b]), f"{a} vs {b}")
    _, counts, x, w, dy = _grouped_case("mxfp8", "blocks")
    rowwise, mx = (reference_grouped(r, x, w, dy, counts) for r in ("rowwise", "mxfp8"))
    for got, want in zip(rowwise, mx):
        with pytest.raises(AssertionError):
            _close(got.value, want, RTOL["mxfp8"], "rowwise vs mxfp8 (grouped)")


@pytest.mark.parametrize("recipe", RECIPES)
def test_experts_pad_unaligned_groups(recipe):
    """GroupedExperts pads every expert's rows to the GEMM's multiple: the result is the
    per-expert FP8 SwiGLU of the unpadded rows (reference: each expert's rows on their own,
    through the same GEMM), rows past the counts come out as zeros, and gradients reach the
    rows that were computed only."""
    torch.manual_seed(0)
    E, D, Fh = 4, 64, 96
    experts = GroupedExperts(E, D, Fh)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    experts.use_gemm(grouped_gemm(FP8Plan(recipe)))
    counts = torch.tensor([5, 0, 40, 3])
    x = torch.randn(int(counts.sum()) + 6, D, requires_grad=True)  # 6 rows past the counts
    out = experts(x, counts)
    out.square().sum().backward()
    gemm = experts.gemm
    start, rows = 0, []
    for e, n in enumerate(counts.tolist()):
        xe = F.pad(x.detach()[start:start + n], (0, 0, 0, (-n) % gemm.group_multiple))
        offs = torch.tensor([xe.shape[0]], dtype=torch.int32)
        w1, w3, w2 = (getattr(experts, k).detach()[e:e + 1] for k in ("w1", "w3", "w2"))
        h = F.silu(gemm(xe, w1, offs)) * gemm(xe, w3, offs)
        rows.append(gemm(h, w2, offs)[:n])
        start += n
    torch.testing.assert_close(out[:start].detach(), torch.cat(rows), rtol=0, atol=0)
    assert torch.equal(out[start:].detach(), torch.zeros(6, D))
    assert torch.equal(x.grad[start:], torch.zeros(6, D))
    assert x.grad[:start].abs().sum() > 0 and experts.w2.grad[1].abs().sum() == 0


def test_fp8_experts_stay_close_to_high_precision():
    """An FP8 expert layer is the same function to within FP8's rounding (a few %)."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 64, 96)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    counts = torch.tensor([20, 7, 0, 37])
    x = torch.randn(64, 64)
    exact = experts_loop(x, counts, experts.w1, experts.w3, experts.w2).detach()
    for recipe in RECIPES:
        experts.use_gemm(grouped_gemm(FP8Plan(recipe)))
        got = experts(x, counts).detach()
        err = (got - exact).norm() / exact.norm()
        assert 1e-3 < err < 0.08, (recipe, float(err))
    experts.use_gemm(None)
    torch.testing.assert_close(experts(x, counts), exact, rtol=1e-5, atol=1e-6)


def test_apply_fp8_converts_what_the_docs_say():
    """Attention, dense MLP and shared experts become float8 linears; the output head, the
    router, the shared-expert gate, norms and embeddings stay; every MoE layer's experts get the
    recipe's grouped GEMM; the parameters keep their names, shapes and dtype."""
    from moetrain.model import Transformer
    from tests.harness import tiny_model_config

    cfg = tiny_model_config("model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true")
    with torch.device("meta"):
        model = Transformer(cfg)
    before = {n: (p.shape, p.dtype) for n, p in model.named_parameters()}
    names = apply_fp8(model, FP8Plan("rowwise"))
    assert {n: (p.shape, p.dtype) for n, p in model.named_parameters()} == before
    kinds = {n.split(".", 2)[-1] for n in names}
    assert kinds == {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "mlp.w1",
                     "mlp.w2", "mlp.w3", "moe.shared_experts.w1", "moe.shared_experts.w2",
                     "moe.shared_experts.w3"}
    assert type(model.output) is nn.Linear
    assert type(model.layers["1"].moe.shared_expert_gate) is nn.Linear
    assert all(type(layer.moe.experts.gemm).__name__ == "Float8RowwiseGemm"
               for layer in list(model.layers.values())[1:])
    with torch.device("meta"):
        head = Transformer(cfg)
    assert "output" in apply_fp8(head, FP8Plan("mxfp8", output_head=True))
    assert math.prod(model.output.weight.shape) == cfg.vocab_size * cfg.d_model
