"""Token rounding (model.moe.token_rounding): each expert keeps a multiple of the tile or all."""

import pytest
import torch

from moetrain.config import ConfigError, compose, to_object, validate
from moetrain.model.moe import rounded_counts, token_rounding_keep_mask
from moetrain.model.moe.capacity import capacity_keep_mask, expert_capacity
from tests.model.test_moe_layer import make_layer, naive_moe
from tests.model.tiny import layer_stats


def test_hand_computed_example():
    # tile 4. Expert 0: 5 assignments, r = 1 < 2 -> keep 4, drop the lowest score (0.1, token 2).
    # Experts 1 and 2: 3 assignments each, r = 3 >= 2 -> keep all (the GEMM pads one row).
    # Expert 3: 1 assignment, r = 1 < 2 -> keep none.
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [0, 2], [1, 2]])
    prio = torch.tensor([[0.9, 0.5], [0.6, 0.3], [0.1, 0.8], [0.7, 0.2], [0.4, 0.3], [0.2, 0.1]])
    keep = token_rounding_keep_mask(idx, prio, 4, 4)
    expected = torch.tensor([[True, True], [True, True], [False, True], [True, False],
                             [True, True], [True, True]])
    assert keep.tolist() == expected.tolist()
    # r = 2 = tile / 2 rounds up (keeps all): 6 and 10 stay
    assert rounded_counts(torch.tensor([5, 3, 2, 1, 0, 8, 6, 10, 9]), 4).tolist() == \
        [4, 3, 2, 0, 0, 8, 6, 10, 8]


def test_ties_drop_the_later_token():
    idx = torch.zeros(5, 1, dtype=torch.long)
    prio = torch.full((5, 1), 0.5)
    assert token_rounding_keep_mask(idx, prio, 1, 4).view(-1).tolist() == [True] * 4 + [False]


@pytest.mark.parametrize("tile", [1, 3, 8, 16, 64])
def test_kept_counts_are_whole_tiles_or_full_and_lowest_scores_go_first(tile):
    T, K, E = 300, 2, 8
    scores = torch.rand(T, E)
    prio, idx = scores.topk(K, dim=-1)
    keep = token_rounding_keep_mask(idx, prio, E, tile)
    counts = torch.bincount(idx.view(-1), minlength=E)
    kept = torch.bincount(idx[keep], minlength=E)
    for e in range(E):
        n, m = int(counts[e]), int(kept[e])
        assert m == n or m % tile == 0, (e, n, m)
        assert n - m < (tile + 1) // 2 or (tile == 1 and m == n)
        if m < n:  # every dropped score is below every kept one of that expert
            mine = idx == e
            assert prio[mine & ~keep].max() <= prio[mine & keep].min()
    assert torch.equal(token_rounding_keep_mask(idx, prio, E, 1), torch.ones_like(keep))


@pytest.mark.parametrize("capacity_factor", [None, 0.6])  # capacity 11: remainder 1
def test_layer_equals_naive_reference_with_the_rounding_mask(capacity_factor):
    tile = 5  # loads 14, 22, 22, 14 (dropless, seed 0): remainders 4 (kept) and 2 (dropped)
    layer = make_layer(capacity_factor=capacity_factor, token_rounding=tile)
    x = torch.randn(4, 9, 32)  # 36 tokens x 2 / 4 experts: about 18 per expert
    out = layer(x)
    _, scores, top_i = naive_moe(layer, x)
    prio = scores.gather(1, top_i)
    keep = torch.ones_like(top_i, dtype=torch.bool)
    if capacity_factor is not None:
        keep = capacity_keep_mask(top_i, prio, 4, expert_capacity(36, 2, 4, capacity_factor))
    masked = top_i.masked_fill(~keep, 4)
    rounded = token_rounding_keep_mask(masked, prio, 5, tile)
    assert (keep & ~rounded).any()  # rounding must drop something here to test anything
    keep = keep & rounded
    expected, _, _ = naive_moe(layer, x, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    stats = layer_stats(layer)
    assert int(stats.dropped) == int((~keep).sum())
    kept = torch.bincount(top_i[keep], minlength=4)
    before = torch.bincount(masked.view(-1), minlength=5)[:4]
    assert all(int(k) % tile == 0 or k == b for k, b in zip(kept, before))
    out.sum().backward()  # the mask is not differentiable; gradients still flow
    assert layer.experts.w1.grad.abs().sum() > 0


def test_off_by_default_and_validated():
    cfg = to_object(compose(["+experiment=tiny"]))
    assert cfg.model.moe.token_rounding is None
    validate(to_object(compose(["+experiment=tiny", "model.moe.token_rounding=128"])))
    for bad in ("0", "-4"):
        with pytest.raises(ConfigError) as err:
            validate(to_object(compose(["+experiment=tiny", f"model.moe.token_rounding={bad}"])))
        assert "model.moe.token_rounding" in str(err.value) and "\n" not in str(err.value)
