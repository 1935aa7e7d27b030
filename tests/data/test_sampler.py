import itertools

import pytest

from moetrain.data import GlobalBatchSampler, val_steps


def _steps(sampler, n):
    return [sampler.next_step() for _ in range(n)]


def _flat(step):
    return list(itertools.chain.from_iterable(step))


def test_deterministic_and_seeded():
    a, b = GlobalBatchSampler(100, 8, 2, seed=1), GlobalBatchSampler(100, 8, 2, seed=1)
    c = GlobalBatchSampler(100, 8, 2, seed=2)
    sa, sb, sc = _steps(a, 30), _steps(b, 30), _steps(c, 30)
    assert sa == sb
    assert sa != sc
    assert all(len(step) == 4 and all(len(mb) == 2 for mb in step) for step in sa)


def test_epoch_covers_samples_once_then_rolls_over_dropping_the_tail():
    s = GlobalBatchSampler(30, 8, 4, seed=0)
    assert s.steps_per_epoch == 3
    epoch0 = [_flat(st) for st in _steps(s, 3)]
    seen = sum(epoch0, [])
    assert len(set(seen)) == 24 and all(0 <= i < 30 for i in seen)
    assert (s.epoch, s.position) == (0, 24)
    epoch1 = [_flat(st) for st in _steps(s, 3)]
    assert (s.epoch, s.position) == (1, 24)
    assert epoch1 != epoch0 and len(set(sum(epoch1, []))) == 24
    # Epoch 1 is a fresh permutation: it may reuse the 6 samples dropped at the end of epoch 0.
    assert GlobalBatchSampler(30, 8, 4, shuffle=False).next_step() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("dp,micro", [(2, 2), (4, 1), (4, 2), (8, 1)])
def test_dp_ranks_partition_the_global_batch_contiguously(dp, micro):
    G, steps = 16, 20  # crosses two epochs of 97 // 16 = 6 steps
    single = [_flat(st) for st in _steps(GlobalBatchSampler(97, G, micro, seed=5), steps)]
    ranks = [_steps(GlobalBatchSampler(97, G, micro, dp_rank=r, dp_size=dp, seed=5), steps) for r in range(dp)]
    for t in range(steps):
        slices = [_flat(ranks[r][t]) for r in range(dp)]
        assert all(len(mb) == micro for r in range(dp) for mb in ranks[r][t])
        assert sum(slices, []) == single[t]  # concatenated rank slices == the dp=1 global batch
        for r in range(dp):
            assert slices[r] == single[t][r * G // dp : (r + 1) * G // dp]
        assert len(set(sum(slices, []))) == G  # disjoint


def test_state_dict_resume_continues_identically():
    ref = GlobalBatchSampler(50, 8, 2, dp_rank=1, dp_size=2, seed=9)
    ref_steps = _steps(ref, 25)
    for cut in (0, 3, 6, 7, 13):
        s = GlobalBatchSampler(50, 8, 2, dp_rank=1, dp_size=2, seed=9)
        _steps(s, cut)
        state = s.state_dict()
        fresh = GlobalBatchSampler(50, 8, 2, dp_rank=1, dp_size=2, seed=123)  # the state's seed wins
        fresh.load_state_dict(dict(state))
        assert _steps(fresh, 25 - cut) == ref_steps[cut:]
    assert set(state) >= {"epoch", "position", "seed", "num_samples", "global_batch_size"}


def test_resume_with_other_dp_size_or_global_batch():
    s = GlobalBatchSampler(64, 8, 2, seed=3)
    _steps(s, 2)
    state = s.state_dict()
    order = [_flat(st) for st in _steps(GlobalBatchSampler(64, 8, 2, seed=3), 8)]
    # A new layout (dp 2 -> 4 ranks, rank 0) continues the same global batches.
    r0 = GlobalBatchSampler(64, 8, 2, dp_rank=0, dp_size=4, seed=3)
    r0.load_state_dict(state)
    assert _flat(r0.next_step()) == order[2][:2]
    # A new global batch size continues from the same sample offset in the same order.
    g16 = GlobalBatchSampler(64, 16, 2, seed=3)
    g16.load_state_dict(state)
    assert _flat(g16.next_step()) == order[2] + order[3]


def test_bad_sizes_and_mismatched_state():
    with pytest.raises(ValueError, match=r"train\.global_batch_size=12.*train\.micro_batch_size=2.*data-parallel size 4"):
        GlobalBatchSampler(100, 12, 2, dp_size=4)
    with pytest.raises(ValueError, match="must be positive"):
        GlobalBatchSampler(100, 8, 0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        GlobalBatchSampler(100, 8, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match=r"7 sequences.*train\.global_batch_size=8"):
        GlobalBatchSampler(7, 8, 2)
    state = GlobalBatchSampler(100, 8, 2).state_dict()
    with pytest.raises(ValueError, match="100 training sequences.*current data has 101"):
        GlobalBatchSampler(101, 8, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        GlobalBatchSampler(100, 8, 2, shuffle=False).load_state_dict(state)


def test_val_steps_are_the_first_batches_split_like_training():
    steps = val_steps(50, 4, 8, 2, dp_rank=1, dp_size=2)
    assert steps == [[[4, 5], [6, 7]], [[12, 13], [14, 15]], [[20, 21], [22, 23]], [[28, 29], [30, 31]]]
    assert len(val_steps(50, 100, 8, 2)) == 6  # clipped to the whole batches there are
    assert val_steps(50, 0, 8, 2) == []
    with pytest.raises(ValueError, match="validation split has 5 sequences"):
        val_steps(5, 2, 8, 2)
    with pytest.raises(ValueError, match="divisible"):
        val_steps(50, 2, 8, 3)
