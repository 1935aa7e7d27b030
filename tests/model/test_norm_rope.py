import math

import torch

from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, rope_cos_sin


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_hand_example():
    # head_dim 4: frequencies 1 and theta^-1/2 = 0.01 for theta 1e4; position 2.
    cos, sin = rope_cos_sin(torch.tensor([2]), 4, theta=10000.0)
    angles = torch.tensor([2.0, 0.02, 2.0, 0.02])
    torch.testing.assert_close(cos[0], angles.cos())
    torch.testing.assert_close(sin[0], angles.sin())
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    y = apply_rope(x, cos, sin).flatten()
    # pairs (x0, x2) and (x1, x3) rotate as complex numbers by angle 2 and 0.02
    z0 = complex(1, 3) * complex(math.cos(2), math.sin(2))
    z1 = complex(2, 4) * complex(math.cos(0.02), math.sin(0.02))
    torch.testing.assert_close(y, torch.tensor([z0.real, z1.real, z0.imag, z1.imag]))


def test_rope_scores_depend_only_on_relative_position():
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 8)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 8)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 3), score(105, 103))
    assert not torch.allclose(score(5, 3), score(5, 4))


def test_rope_per_batch_positions():
    x = torch.randn(2, 3, 2, 4)
    pos = torch.tensor([[0, 1, 2], [10, 11, 12]])
    y = apply_rope(x, *rope_cos_sin(pos, 4))
    y1 = apply_rope(x[1:], *rope_cos_sin(pos[1], 4))
    torch.testing.assert_close(y[1:], y1)
