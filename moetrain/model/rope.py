"""Rotary position embeddings (RoPE) for explicit integer positions, optionally YaRN-scaled.

Positions are passed in, never assumed to be 0..S-1, so a context-parallel shard (which holds
non-contiguous chunks of a sequence) gets the rotation of its true positions. Rotation uses the
"rotate half" pairing (dimension i with i + head_dim/2), the GPT-NeoX / Hugging Face Llama layout
(checkpoints that pair dimensions 2i, 2i+1, as DeepSeek's, are permuted on import: moetrain/hf).

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"):
frequencies above the original context are interpolated by `factor`, a linear ramp between
the beta_fast and beta_slow rotation counts blends them, and cos/sin are multiplied by the
attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim) - the formulas of
Hugging Face's `_compute_yarn_parameters` (truncated correction range), so imported DeepSeek
models rotate exactly as there.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 mscale ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: Optional[Any]) -> float:
    """The factor cos and sin are multiplied by (1 without scaling)."""
    if scaling is None or scaling.kind == "none":
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor,
                                                                          scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[Any] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], fp64; `scaling` a `RopeScalingConfig` (or None)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None or scaling.kind == "none":
        return inv_freq

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return (head_dim * math.log(scaling.original_max_position_embeddings
                                    / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoids a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float64) - low)
            / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv_freq / scaling.factor * (1 - extrapolate) + inv_freq * extrapolate


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, scaling: Optional[Any] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, fp32, of shape positions.shape + (head_dim,).

    Angles are formed in fp64 so that a position's rotation does not depend on its magnitude's
    fp32 rounding (long contexts) and is identical whichever shard computes it.
    """
    assert head_dim % 2 == 0, head_dim  # validated config (model.head_dim)
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [..., head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    factor = rope_attention_factor(scaling)
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def apply_rope(x_BSHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, head_dim] by tables of shape [S, head_dim] or [B, S, head_dim]."""
    cos = cos.unsqueeze(-2)  # broadcast over heads
    sin = sin.unsqueeze(-2)
    x32 = x_BSHd.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x_BSHd.dtype)
