"""Which sample indices each data-parallel rank trains on at each optimizer step.

The global batch of a step is a fixed function of the seed and the sampler state, whatever the
layout: data-parallel rank r takes the contiguous slice [r*G/dp, (r+1)*G/dp) of it and splits that into
micro-batches. Concatenating the ranks' slices in rank order gives the single-rank global batch,
which is what makes multi-rank losses comparable with the single-process run.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np

from moetrain.data.errors import DataError, DataExhausted

log = logging.getLogger(__name__)

STATE_VERSION = 2


def _check_sizes(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if global_batch_size < 1 or micro_batch_size < 1 or dp_size < 1:
        raise ValueError(f"train.global_batch_size={global_batch_size}, train.micro_batch_size="
                         f"{micro_batch_size} and the data-parallel size {dp_size} must be positive")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"train.global_batch_size={global_batch_size} must be divisible by "
                         f"train.micro_batch_size={micro_batch_size} x data-parallel size {dp_size} "
                         f"(= {micro_batch_size * dp_size})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} out of range for data-parallel size {dp_size}")


def _rank_micro_batches(batch: np.ndarray, micro: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    per_rank = batch.shape[0] // dp_size
    mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank].tolist()
    return [mine[i : i + micro] for i in range(0, per_rank, micro)]


class MixtureSampler:
    """Deterministic, resumable sample order for training on a weighted mixture of sources.

    Source s holds sizes[s] sequences; global index offsets[s] + i is its sequence i (the index
    space of `MixtureDataset`). Each `next_step()` draws one global batch:

    - counts: source s gets c_s sequences, the largest-remainder rounding of credit_s + G * w_s
      (w normalised, sum c_s = G), and keeps credit_s += G * w_s - c_s, always in (-1, 1): after
      b batches, source s has given b * G * w_s sequences to within one;
    - which: the next c_s of the permutation of its epoch e, numpy's default_rng([seed, e]) for
      source 0 and default_rng([seed, e, s]) for the others (the identity when shuffle=False).
      When fewer than c_s remain, they are dropped and the source starts epoch e + 1
      (on_exhausted="repeat"), or `DataExhausted` is raised and nothing changes ("stop");
    - where: the sources' draws interleaved by position (j + 0.5) / c_s, so every data-parallel
      rank's slice and micro-batch sees the mixture.

    With one source this is a plain epoch-wise shuffle in global batches. The state is per
    source (epoch, position, credit, sequences drawn); resuming with other weights, or with
    sources added or removed, goes on from there; a source with another number of sequences is
    refused (its order would not be a continuation). The seed stored in the state wins.
    """

    def __init__(self, sizes: Sequence[int], global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True,
                 weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
                 on_exhausted: str = "repeat"):
        _check_sizes(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.sizes = [int(n) for n in sizes]
        n = len(self.sizes)
        self.names = list(names) if names is not None else [f"source{i}" for i in range(n)]
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if n == 0 or len(weights) != n or len(self.names) != n or min(weights) <= 0:
            raise ValueError(f"need one positive weight and one name per source, got {weights}, {self.names}")
        self.weights = [w / sum(weights) for w in weights]
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = int(seed), shuffle
        self.on_exhausted = str(getattr(on_exhausted, "value", on_exhausted))
        self.offsets = np.cumsum([0] + self.sizes)
        for name, size, w in zip(self.names, self.sizes, self.weights):
            need = _max_count(global_batch_size, w)
            if size < need:
                share = "" if n == 1 else f" (its share of a batch is up to {need})"
                raise DataError(
                    f"the training split of source {name!r} has {size} sequences, fewer than "
                    f"train.global_batch_size={global_batch_size}{share}; lower the batch size or "
                    "data.seq_len, or give the source more text")
        self.steps = 0
        self.epoch, self.position = [0] * n, [0] * n
        self.credit, self.drawn = [0.0] * n, [0] * n
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != s}
            if self.shuffle:
                # SeedSequence mixes the words into independent streams (no seed+epoch collisions).
                rng = np.random.default_rng([self.seed % 2**64, epoch] + ([s] if s else []))
                self._orders[key] = rng.permutation(self.sizes[s])
            else:
                self._orders[key] = np.arange(self.sizes[s])
        return self._orders[key]

    def _counts(self) -> tuple[list[int], list[float]]:
        G = self.global_batch_size
        want = [c + G * w for c, w in zip(self.credit, self.weights)]
        counts = [math.floor(x) for x in want]
        short = G - sum(counts)
        # Ties go to the earlier source, so the counts are a pure function of the state.
        for s in sorted(range(len(want)), key=lambda s: (counts[s] - want[s], s))[:max(0, short)]:
            counts[s] += 1
        return counts, [x - c for x, c in zip(want, counts)]

    def next_global_batch(self) -> np.ndarray:
        """The next step's global batch (all ranks' global indices, in rank order); advances the
        state. Raises DataExhausted (state unchanged) when a source is used up under "stop"."""
        counts, credit = self._counts()
        epoch, position = list(self.epoch), list(self.position)
        draws, keys = [], []
        for s, c in enumerate(counts):
            if position[s] + c > self.sizes[s]:
                if self.on_exhausted == "stop":
                    raise DataExhausted(
                        f"source {self.names[s]!r} has no sequences left for step {self.steps + 1} "
                        f"(all {self.sizes[s]} drawn, data.on_exhausted=stop)")
                epoch[s], position[s] = epoch[s] + 1, 0
            draws.append(self._order(s, epoch[s])[position[s] : position[s] + c] + self.offsets[s])
            keys.append((np.arange(c) + 0.5) / max(c, 1))
            position[s] += c
        src = np.repeat(np.arange(len(counts)), counts)
        batch = np.concatenate(draws)[np.lexsort((src, np.concatenate(keys)))]
        self.epoch, self.position, self.credit = epoch, position, credit
        self.drawn = [d + c for d, c in zip(self.drawn, counts)]
        self.steps += 1
        return batch

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of global sample indices) for the next optimizer step."""
        return _rank_micro_batches(self.next_global_batch(), self.micro_batch_size, self.dp_rank, self.dp_size)

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            yield self.next_step()

    def consumed(self) -> dict[str, int]:
        """Sequences drawn from each source so far (over all ranks), by source name."""
        return dict(zip(self.names, self.drawn))

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "steps": self.steps,
                "sources": {name: {"num_samples": self.sizes[s], "epoch": self.epoch[s],
                                   "position": self.position[s], "credit": self.credit[s],
                                   "drawn": self.drawn[s]}
                            for s, name in enumerate(self.names)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; raises DataError when the checkpoint's data cannot be continued."""
        if state.get("version") == 1 and len(self.names) == 1:  # a one-source sampler's state
            state = {**state, "steps": 0, "sources": {self.names[0]: {
                "num_samples": state["num_samples"], "epoch": state["epoch"],
                "position": state["position"], "credit": 0.0,
                "drawn": state["epoch"] * state["num_samples"] + state["position"]}}}
        elif state.get("version") != STATE_VERSION:
            raise DataError(f"the checkpoint's data sampler state has version {state.get('version')}, "
                            f"this moetrain reads {STATE_VERSION}")
        if bool(state["shuffle"]) != self.shuffle:
            raise DataError(f"the checkpoint's data sampler had shuffle={state['shuffle']}, "
                            f"the current one shuffle={self.shuffle}")
        saved = state["sources"]
        for s, name in enumerate(self.names):
            if name not in saved:
                log.info("source %r is new since the checkpoint: it starts at its first epoch", name)
                continue
            st = saved[name]
            if st["num_samples"] != self.sizes[s]:
                raise DataError(
                    f"the checkpoint's data sampler was for {st['num_samples']} training sequences "
                    f"of source {name!r}, the current data has {self.sizes[s]} (did the source, "
                    "data.seq_len, data.val_fraction or the tokenizer change?); the sample order "
                    "cannot be resumed")
            if not (st["epoch"] >= 0 and 0 <= st["position"] <= self.sizes[s]):
                raise DataError(f"invalid sampler state of source {name!r}: {st}")
        for name in saved.keys() - set(self.names):
            log.info("source %r of the checkpoint is no longer configured: dropped", name)
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        for s, name in enumerate(self.names):
            st = saved.get(name, {"epoch": 0, "position": 0, "credit": 0.0, "drawn": 0})
            self.epoch[s], self.position[s] = int(st["epoch"]), int(st["position"])
            self.credit[s], self.drawn[s] = float(st["credit"]), int(st["drawn"])
        if saved.keys() != set(self.names):  # credits of another set of sources: start afresh
            self.credit = [0.0] * len(self.names)
        self._orders = {}


def _max_count(global_batch_size: int, weight: float) -> int:
    # c_s < credit + G * w + 1 with credit < 1: at most ceil(G * w + 2) - 1 in one batch.
    return min(global_batch_size, math.ceil(global_batch_size * weight + 2) - 1)


def val_steps(num_samples: int, num_batches: int, global_batch_size: int, micro_batch_size: int,
              dp_rank: int = 0, dp_size: int = 1) -> list[list[list[int]]]:
    """The fixed evaluation batches: batch k is samples [k*G, (k+1)*G) of the validation split,
    for k < min(num_batches, num_samples // G); each entry is this rank's micro-batches."""
    _check_sizes(global_batch_size, micro_batch_size, dp_rank, dp_size)
    n = min(num_batches, num_samples // global_batch_size)
    if num_batches > 0 and n == 0:
        raise ValueError(f"the validation split has {num_samples} sequences, fewer than one batch of "
                         f"train.global_batch_size={global_batch_size}; raise data.val_fraction or "
                         "set train.eval_every=0")
    G = global_batch_size
    return [_rank_micro_batches(np.arange(k * G, (k + 1) * G), micro_batch_size, dp_rank, dp_size)
            for k in range(n)]
