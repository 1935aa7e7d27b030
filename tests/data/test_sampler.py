import itertools
import json

import numpy as np
import pytest

from moetrain.data import DataError, DataExhausted, MixtureSampler, val_steps


def S(n, G, micro, **kw):
    """A one-source sampler (the sizes list has one entry)."""
    return MixtureSampler([n], G, micro, **kw)


def _steps(sampler, n):
    return [sampler.next_step() for _ in range(n)]


def _flat(step):
    return list(itertools.chain.from_iterable(step))


def test_deterministic_and_seeded():
    a, b, c = S(100, 8, 2, seed=1), S(100, 8, 2, seed=1), S(100, 8, 2, seed=2)
    sa, sb, sc = _steps(a, 30), _steps(b, 30), _steps(c, 30)
    assert sa == sb
    assert sa != sc
    assert all(len(step) == 4 and all(len(mb) == 2 for mb in step) for step in sa)


def test_one_source_is_an_epochwise_shuffle_in_global_batches():
    # The order training had before mixtures (so one-source runs keep their samples): epoch e is
    # default_rng([seed, e]).permutation, consumed G at a time, the tail dropped.
    s = S(30, 8, 4, seed=7)
    got = [_flat(st) for st in _steps(s, 7)]
    perms = [np.random.default_rng([7, e]).permutation(30).tolist() for e in range(3)]
    assert got == [perms[0][0:8], perms[0][8:16], perms[0][16:24],
                   perms[1][0:8], perms[1][8:16], perms[1][16:24], perms[2][0:8]]
    assert (s.epoch, s.position, s.consumed()) == ([2], [8], {"source0": 56})
    assert S(30, 8, 4, shuffle=False).next_step() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("dp,micro", [(2, 2), (4, 1), (4, 2), (8, 1)])
def test_dp_ranks_partition_the_global_batch_contiguously(dp, micro):
    G, steps = 16, 20
    kw = dict(seed=5, weights=[0.6, 0.3, 0.1])
    sizes = [97, 40, 9]  # the small sources roll over into new epochs within the run
    single = [_flat(st) for st in _steps(MixtureSampler(sizes, G, micro, **kw), steps)]
    ranks = [_steps(MixtureSampler(sizes, G, micro, dp_rank=r, dp_size=dp, **kw), steps) for r in range(dp)]
    for t in range(steps):
        slices = [_flat(ranks[r][t]) for r in range(dp)]
        assert all(len(mb) == micro for r in range(dp) for mb in ranks[r][t])
        assert sum(slices, []) == single[t]  # concatenated rank slices == the dp=1 global batch
        for r in range(dp):
            assert slices[r] == single[t][r * G // dp : (r + 1) * G // dp]
        assert len(set(sum(slices, []))) == G  # disjoint


def test_mixture_shares_follow_the_weights():
    sizes, weights, G = [8000, 4000, 400], [0.5, 0.3, 0.2], 64
    s = MixtureSampler(sizes, G, 8, seed=3, weights=[5, 3, 2])  # normalised
    offsets = np.cumsum([0] + sizes)
    counts = np.zeros(3)
    for _ in range(200):
        batch = s.next_global_batch()
        assert len(set(batch.tolist())) == G  # no sequence twice in a batch
        src = np.searchsorted(offsets, batch, side="right") - 1
        per_batch = np.bincount(src, minlength=3)
        assert np.all(np.abs(per_batch - G * np.array(weights)) < 1 + 1e-9)  # every batch, to one
        counts += per_batch
        # The sources are spread over the batch, so each DP rank / micro-batch sees the mixture.
        assert set(src[: G // 4].tolist()) == {0, 1, 2}
    shares = counts / counts.sum()
    assert np.all(np.abs(shares - weights) < 0.02), shares
    assert s.consumed() == {f"source{i}": int(c) for i, c in enumerate(counts)}
    # The small source went through 200 * 12.8 / 400 = 6.4 epochs, each a fresh permutation.
    assert s.epoch == [0, 0, 6]


def test_a_source_smaller_than_its_share_or_exhausted_under_stop():
    with pytest.raises(DataError, match=r"source 'b' has 2 sequences, fewer than train\.global_batch_size=8 "
                                        r"\(its share of a batch is up to 3\)"):
        MixtureSampler([100, 2], 8, 2, weights=[0.8, 0.2], names=["a", "b"])
    with pytest.raises(DataError, match=r"source 'x' has 7 sequences.*train\.global_batch_size=8"):
        MixtureSampler([7], 8, 2, names=["x"])
    s = MixtureSampler([100, 10], 8, 2, weights=[3, 1], names=["a", "b"], on_exhausted="stop")
    for _ in range(5):  # b gives 2 a step: 10 sequences last 5 steps
        s.next_step()
    state = json.dumps(s.state_dict())
    with pytest.raises(DataExhausted, match=r"source 'b' has no sequences left for step 6.*data\.on_exhausted=stop"):
        s.next_step()
    assert json.dumps(s.state_dict()) == state  # unchanged: a checkpoint now resumes right here


def test_state_dict_resume_continues_identically():
    kw = dict(dp_rank=1, dp_size=2, weights=[0.7, 0.2, 0.1], names=["a", "b", "c"])
    ref = MixtureSampler([50, 30, 12], 8, 2, seed=9, **kw)
    ref_steps = _steps(ref, 25)
    for cut in (0, 3, 6, 7, 13):
        s = MixtureSampler([50, 30, 12], 8, 2, seed=9, **kw)
        _steps(s, cut)
        state = json.loads(json.dumps(s.state_dict()))  # as stored in a checkpoint
        fresh = MixtureSampler([50, 30, 12], 8, 2, seed=123, **kw)  # the state's seed wins
        fresh.load_state_dict(state)
        assert _steps(fresh, 25 - cut) == ref_steps[cut:]
        assert fresh.consumed() == ref.consumed()
    assert set(state["sources"]["a"]) >= {"epoch", "position", "credit", "drawn", "num_samples"}


def test_resume_with_other_dp_size_or_global_batch():
    s = S(64, 8, 2, seed=3)
    _steps(s, 2)
    state = s.state_dict()
    order = [_flat(st) for st in _steps(S(64, 8, 2, seed=3), 8)]
    # A new layout (dp 2 -> 4 ranks, rank 0) continues the same global batches.
    r0 = S(64, 8, 2, dp_rank=0, dp_size=4, seed=3)
    r0.load_state_dict(state)
    assert _flat(r0.next_step()) == order[2][:2]
    # A new global batch size continues from the same sample offset in the same order.
    g16 = S(64, 16, 2, seed=3)
    g16.load_state_dict(state)
    assert _flat(g16.next_step()) == order[2] + order[3]


def test_resume_with_other_weights_or_sources():
    s = MixtureSampler([100, 50], 10, 2, weights=[0.5, 0.5], names=["a", "b"])
    _steps(s, 3)
    state = s.state_dict()
    # Other weights: each source goes on where it was.
    t = MixtureSampler([100, 50], 10, 2, weights=[0.8, 0.2], names=["a", "b"])
    t.load_state_dict(state)
    assert (t.position, t.consumed()) == ([15, 15], {"a": 15, "b": 15})
    assert np.bincount(np.searchsorted(t.offsets, t.next_global_batch(), side="right") - 1).tolist() == [8, 2]
    # A new source starts at its beginning; a removed one is dropped.
    u = MixtureSampler([100, 70], 10, 2, names=["a", "c"])
    u.load_state_dict(state)
    assert (u.position, u.consumed()) == ([15, 0], {"a": 15, "c": 0})
    # A source with another number of sequences cannot be continued.
    with pytest.raises(DataError, match=r"100 training sequences of source 'a', the current data has 101"):
        MixtureSampler([101, 50], 10, 2, names=["a", "b"]).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle"):
        MixtureSampler([100, 50], 10, 2, names=["a", "b"], shuffle=False).load_state_dict(state)


def test_a_one_source_state_of_the_previous_version_resumes():
    old = {"version": 1, "seed": 4, "epoch": 1, "position": 16, "num_samples": 40,
           "global_batch_size": 8, "shuffle": True}
    s = S(40, 8, 2)
    s.load_state_dict(old)
    assert _flat(s.next_step()) == np.random.default_rng([4, 1]).permutation(40)[16:24].tolist()


def test_bad_sizes():
    with pytest.raises(ValueError, match=r"train\.global_batch_size=12.*train\.micro_batch_size=2.*data-parallel size 4"):
        S(100, 12, 2, dp_size=4)
    with pytest.raises(ValueError, match="must be positive"):
        S(100, 8, 0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        S(100, 8, 2, dp_rank=2, dp_size=2)


def test_val_steps_are_the_first_batches_split_like_training():
    steps = val_steps(50, 4, 8, 2, dp_rank=1, dp_size=2)
    assert steps == [[[4, 5], [6, 7]], [[12, 13], [14, 15]], [[20, 21], [22, 23]], [[28, 29], [30, 31]]]
    assert len(val_steps(50, 100, 8, 2)) == 6  # clipped to the whole batches there are
    assert val_steps(50, 0, 8, 2) == []
    with pytest.raises(ValueError, match="validation split has 5 sequences"):
        val_steps(5, 2, 8, 2)
    with pytest.raises(ValueError, match="divisible"):
        val_steps(50, 2, 8, 3)
