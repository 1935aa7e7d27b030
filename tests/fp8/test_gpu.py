"""On an NVIDIA GPU (the GPU check's gpu_tests step): torchao's FP8 kernels against moetrain's
emulation of the same recipe - the grouped GEMM of the routed experts and the float8 linear,
forward and both gradients. Both quantize identically; the kernels accumulate differently
(fast accumulation) and return bf16, so they agree to bf16-level error, far below the FP8
rounding both carry (a few %). Recipes the GPU cannot run are skipped, saying why."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tests.fp8 import require_torchao

require_torchao()

from moetrain.config import ConfigError  # noqa: E402
from moetrain.config.schema import TrainConfig  # noqa: E402
from moetrain.fp8 import resolve_fp8  # noqa: E402
from moetrain.fp8.grouped import grouped_gemm  # noqa: E402
from moetrain.fp8.linear import convert_linears  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = 2e-2  # whole-tensor rel. error, kernel vs emulation


def _plan(recipe: str):
    try:
        return resolve_fp8(TrainConfig(fp8=recipe), torch.device("cuda"))
    except ConfigError as err:
        pytest.skip(str(err))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("recipe", ["rowwise", "mxfp8"])
def test_grouped_gemm_kernel_matches_the_emulation(recipe):
    plan = _plan(recipe)
    real, emulated = grouped_gemm(plan), grouped_gemm(dataclasses.replace(plan, emulate=True))
    g = torch.Generator(device="cuda").manual_seed(0)
    m = real.group_multiple
    counts = torch.tensor([4 * m, 0, 9 * m, m], device="cuda")
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 512, device="cuda", generator=g).bfloat16()
    w = (torch.randn(4, 512, 256, device="cuda", generator=g) / 512 ** 0.5).bfloat16()
    dy = torch.randn(x.shape[0], 256, device="cuda", generator=g).bfloat16()
    results = []
    for gemm in (real, emulated):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = gemm(xi, wi, offsets)
        out.backward(dy)
        results.append((out, xi.grad, wi.grad))
    for name, a, b in zip(("output", "input gradient", "weight gradient"), *results):
        assert _rel(a, b) < TOL, (recipe, name, _rel(a, b))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "mxfp8"])
def test_float8_linear_kernel_matches_the_emulation(recipe):
    plan = _plan(recipe)
    torch.manual_seed(0)
    base = nn.Linear(512, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for p in (plan, dataclasses.replace(plan, emulate=True)):
        model = nn.Sequential(nn.Linear(512, 256, bias=False, device="cuda", dtype=torch.bfloat16))
        model[0].weight.data.copy_(base.weight.data)
        convert_linears(model, p)
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(dy)
        results.append((out, xi.grad, model[0].weight.grad))
    for name, a, b in zip(("output", "input gradient", "weight gradient"), *results):
        assert _rel(a, b) < TOL, (recipe, name, _rel(a, b))
