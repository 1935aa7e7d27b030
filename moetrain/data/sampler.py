"""Which sample indices each data-parallel rank trains on at each optimizer step.

The global batch of a step is a fixed function of (seed, epoch, position), whatever the layout:
data-parallel rank r takes the contiguous slice [r*G/dp, (r+1)*G/dp) of it and splits that into
micro-batches. Concatenating the ranks' slices in rank order gives the single-rank global batch,
which is what makes multi-rank losses comparable with the single-process run.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

STATE_VERSION = 1


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


class GlobalBatchSampler:
    """Deterministic, resumable sample order for training.

    Epoch e visits the samples in the permutation drawn from numpy's default_rng([seed, e]) (the
    identity when shuffle=False). Each `next_step()` consumes the next `global_batch_size` samples
    of the epoch; when fewer than that remain, they are dropped and the next epoch starts.

    The state is (epoch, position in samples within the epoch). Resuming with a different global
    batch size is allowed: the order of samples is unchanged and the new batches continue from
    the same sample offset. Resuming with a different `num_samples` or `shuffle` is refused (the
    order would not be a continuation). The seed stored in the state wins over the constructor's.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        _check_sizes(global_batch_size, micro_batch_size, dp_rank, dp_size)
        if num_samples < global_batch_size:
            raise ValueError(f"the training split has {num_samples} sequences, fewer than "
                             f"train.global_batch_size={global_batch_size}; lower the batch size or "
                             "data.seq_len, or use a larger data.corpus")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                # SeedSequence mixes (seed, epoch) into independent streams (no seed+epoch collisions).
                rng = np.random.default_rng([self.seed % 2**64, self.epoch])
                self._order = rng.permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
        return self._order

    def next_global_batch(self) -> np.ndarray:
        """The next step's global batch (all ranks' samples, in rank order); advances the state."""
        if self.position + self.global_batch_size > self.num_samples:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        batch = self._epoch_order()[self.position : self.position + self.global_batch_size]
        self.position += self.global_batch_size
        return batch

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for the next optimizer step."""
        return _rank_micro_batches(self.next_global_batch(), self.micro_batch_size, self.dp_rank, self.dp_size)

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch,
                "position": self.position, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')} is not {STATE_VERSION}")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"the checkpoint's data sampler was for {state['num_samples']} training "
                             f"sequences, the current data has {self.num_samples} (did data.corpus, "
                             "data.seq_len, data.val_fraction or model.vocab_size change?); the sample "
                             "order cannot be resumed")
        if bool(state["shuffle"]) != self.shuffle:
            raise ValueError(f"the checkpoint's data sampler had shuffle={state['shuffle']}, "
                             f"the current one shuffle={self.shuffle}")
        if not (state["epoch"] >= 0 and 0 <= state["position"] <= self.num_samples):
            raise ValueError(f"invalid sampler state: epoch={state['epoch']} position={state['position']}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = None


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
