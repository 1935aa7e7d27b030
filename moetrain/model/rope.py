"""Rotary position embeddings (RoPE) for explicit integer positions.

Positions are passed in, never assumed to be 0..S-1, so a context-parallel shard (which holds
non-contiguous chunks of a sequence) gets the rotation of its true positions. Rotation uses the
"rotate half" pairing (dimension i with i + head_dim/2), the GPT-NeoX / Hugging Face Llama layout.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, fp32, of shape positions.shape + (head_dim,).

    Angles are formed in fp64 so that a position's rotation does not depend on its magnitude's
    fp32 rounding (long contexts) and is identical whichever shard computes it.
    """
    assert head_dim % 2 == 0, head_dim  # validated config (model.head_dim)
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [..., head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BSHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, head_dim] by tables of shape [S, head_dim] or [B, S, head_dim]."""
    cos = cos.unsqueeze(-2)  # broadcast over heads
    sin = sin.unsqueeze(-2)
    x32 = x_BSHd.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x_BSHd.dtype)
