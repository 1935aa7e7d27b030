"""Sharded checkpoints with torch.distributed.checkpoint (DCP) and an atomically replaced `latest`.

Layout under `${run.dir}/checkpoints/`:
    step_<N>/      DCP files (.metadata + one shard file per rank) and `meta.json`
    latest         one line naming the newest *complete* checkpoint directory

A checkpoint is written into `step_<N>.partial/`, renamed to `step_<N>/` once every rank has
finished, and only then is `latest` replaced (write a temp file, `os.replace`). A crash at any
point therefore leaves `latest` naming the previous complete checkpoint; a save that fails
removes its `.partial` and raises one line (`storage.py`).

Every file's checksum is in `checksums.json` and is verified before anything is unpickled
(`integrity.py`): a checkpoint is a pickle, so only load checkpoints from a trusted source.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moetrain.checkpoint import integrity, storage

# One process without a process group is a supported way to run, not something to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")

FORMAT_VERSION = 2  # 2: checksums.json
_STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class TrainState:
    """Everything besides model, optimizer and RNG states that a bit-exact resume needs.

    The learning rate and the sparsity schedules are pure functions of `step`; the routers'
    aux-loss-free biases are model buffers."""

    step: int = 0
    consumed_tokens: int = 0
    bad_steps_total: int = 0
    sampler: dict[str, Any] | None = None
    # Non-finite steps in a row up to `step`: a resume continues the count (train.max_bad_steps).
    bad_in_row: int = 0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int | None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self._pending = None  # (future, partial dir, final dir, meta) of a background save
        self._group = None
        self._verified: set[Path] = set()  # checkpoints `choose` verified: `load` trusts them

    # ------------------------------------------------------------------ paths
    def step_dir(self, step: int) -> Path:
        return self.root / f"{_STEP_PREFIX}{step}"

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not (path / ".metadata").exists():
            raise CheckpointError(
                f"{pointer} names {name!r}, but {path / '.metadata'} is missing: the checkpoint "
                "is incomplete or was deleted; pass checkpoint.resume=PATH or checkpoint.resume=never"
            )
        return path

    # ------------------------------------------------------------------ save
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
             meta: dict[str, Any], async_save: bool = False) -> Path:
        """Write `step_<N>/`; with `async_save` the files are written in the background and the
        checkpoint is committed (renamed, `latest` replaced) by a later `poll()` or `wait()`."""
        self.wait()  # one checkpoint in flight at a time
        final = self.step_dir(state.step)
        partial = final.with_name(final.name + storage.PARTIAL_SUFFIX)
        self._check_space(final)
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        meta = {"format_version": FORMAT_VERSION, "step": state.step,
                "consumed_tokens": state.consumed_tokens, **meta}
        state_dict = self._state_dict(model, optimizer, state)
        if async_save:
            # Staged to CPU memory before returning, so training may change the weights at once;
            # a separate gloo group keeps the background collectives apart from training's.
            future = dcp.async_save(state_dict, storage_writer=self._writer(partial),
                                    process_group=self._async_group())
            self._pending = (future, partial, final, meta)
            return final
        try:
            dcp.save(state_dict, storage_writer=self._writer(partial))
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            self._failed(partial, err)
        _barrier()
        error = None
        if _rank() == 0:
            try:
                self._commit(partial, final, meta)
            except OSError as err:  # meta.json or the manifest did not fit
                error = err
        # every rank learns whether rank 0's commit worked (also the barrier)
        box = [None if error is None else storage.write_error(error, partial)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            self._failed(partial, error or OSError(box[0]))
        return final

    @staticmethod
    def _writer(partial: Path) -> integrity.ChecksummingWriter:
        return integrity.ChecksummingWriter(str(partial))

    def _failed(self, partial: Path, err: BaseException) -> None:
        """A save failed on some rank (DCP tells every rank): remove its folder, keep `latest`
        and the earlier checkpoints, and say why in one line."""
        if _rank() == 0:
            storage.remove(partial)
        raise CheckpointError(f"cannot write checkpoint {partial}: "
                              f"{storage.write_error(err, partial)}; latest still names "
                              f"{self.latest_name()}") from None

    def latest_name(self) -> str:
        """What `latest` names, for messages."""
        pointer = self.root / "latest"
        return pointer.read_text().strip() if pointer.exists() else "no checkpoint"

    def _check_space(self, final: Path) -> None:
        """Refuse a save that would not fit next to the newest checkpoint, before writing a byte
        (rank 0 decides for every rank, so that all of them refuse together)."""
        problem = None
        if _rank() == 0:
            previous = self.root / self.latest_name()
            problem = storage.space_problem(self.root, previous if previous != final else None)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem:
            raise CheckpointError(f"not saving {final.name}: {problem}")

    def remove_stale_partials(self) -> None:
        """Rank 0: delete `.partial` folders left by saves that crashed (logged); call before
        this run's first save."""
        if _rank() == 0:
            storage.remove_stale_partials(self.root)

    def poll(self) -> None:
        """Commit a finished background save (call once per step; cheap when nothing is pending)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until a background save finished, then commit it."""
        if self._pending is None:
            return
        future, partial, final, meta = self._pending
        self._pending = None
        try:
            future.result()  # re-raises a failed save: `latest` then still names the previous one
            # DCP's coordinator (rank 0) writes .metadata only after every rank's shards are
            # written, so rank 0 may commit without a barrier once its own future is done.
            self._commit(partial, final, meta)
        except (Exception, CheckpointException) as err:
            self._failed(partial, err)

    def _commit(self, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        if _rank() != 0:
            return
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        integrity.write_manifest(partial)  # last: its presence means every file is complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        self._point_latest(final)
        self._prune(keep=final)

    def _async_group(self):
        if not dist.is_initialized():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _state_dict(self, model, optimizer, state: TrainState) -> dict[str, Any]:
        world = dist.get_world_size() if dist.is_initialized() else 1
        train = {
            "step": state.step,
            "consumed_tokens": state.consumed_tokens,
            "bad_steps_total": state.bad_steps_total,
            "bad_in_row": state.bad_in_row,
            "sampler": state.sampler,
            "world_size": world,
        }
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            # One opaque leaf: DCP flattens nested dicts, and a resume must get all of it or fail.
            "train": json.dumps(train),
            # Each rank's RNG under its own key, so a resume at the same layout restores all of them.
            f"rng_rank{_rank()}": rng_state(),
        }

    def _point_latest(self, path: Path) -> None:
        tmp = self.root / "latest.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, self.root / "latest")

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        steps = sorted(
            (p for p in self.root.glob(f"{_STEP_PREFIX}*") if p.is_dir() and p.suffix != ".partial"),
            key=lambda p: int(p.name[len(_STEP_PREFIX):]),
        )
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def resolve(self, resume: str) -> Path | None:
        """Which checkpoint `checkpoint.resume` asks for: None means start fresh."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if (path / "latest").exists():  # a checkpoints/ folder
            return CheckpointManager(path.parent, None).latest()
        if (path / "checkpoints" / "latest").exists():  # a run directory
            return CheckpointManager(path, None).latest()
        if not (path / ".metadata").exists():
            raise CheckpointError(
                f"checkpoint.resume={resume!r}: no checkpoint there ({path / '.metadata'} is missing); "
                "valid: auto, never, a step_<N> directory, a checkpoints/ folder or a run directory"
            )
        return path

    def auto_candidates(self) -> list[Path]:
        """What `checkpoint.resume=auto` may resume from, best first: the one `latest` names,
        then every other complete `step_<N>` folder, newest first."""
        steps = sorted((p for p in self.root.glob(f"{_STEP_PREFIX}*")
                        if p.is_dir() and p.name[len(_STEP_PREFIX):].isdigit()),
                       key=lambda p: -int(p.name[len(_STEP_PREFIX):]))
        pointer = self.root / "latest"
        first = [self.root / pointer.read_text().strip()] if pointer.exists() else []
        return first + [p for p in steps if p not in first]

    def choose(self, resume: str) -> tuple[Path | None, list[integrity.Rejected]]:
        """The checkpoint to resume from, verified against its checksums (collective: every rank
        calls it), and the checkpoints passed over on the way. `auto` falls back to the newest
        one that verifies; an explicit path that fails is refused naming the file. A worker
        group restarted in-job or a requeued job resumes from this run's own checkpoints,
        whatever `resume` says (it would otherwise repeat the work since)."""
        if resume != "auto" and _restarted() and self.auto_candidates():
            resume = "auto"
        if resume == "never":
            return None, []
        if resume != "auto":
            path = self.resolve(resume)
            try:
                integrity.verify(path)
            except integrity.IntegrityError as err:
                raise CheckpointError(f"checkpoint.resume={resume!r}: {err}") from None
            self._verified.add(path)
            return path, []
        rejected: list[integrity.Rejected] = []
        for path in self.auto_candidates():
            try:
                integrity.verify(path)
                self._verified.add(path)
                return path, rejected
            except integrity.IntegrityError as err:
                rejected.append(integrity.Rejected(path, str(err)))
        if not rejected:
            return None, []
        raise CheckpointError(
            f"checkpoint.resume=auto: no checkpoint in {self.root} passes verification ("
            + "; ".join(r.reason for r in rejected) + "); they are kept: restore one, or pass "
            "checkpoint.resume=never to start afresh")

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """Load model, optimizer and train state; RNG states too when the world size is unchanged.
        Every file is checked against its checksum first (collectively: every rank calls it)."""
        if path not in self._verified:
            verify(path)
        model_sd = get_model_state_dict(model)
        saved_keys = _check_shapes(path, model_sd)
        optim_sd = get_optimizer_state_dict(model, optimizer)
        _check_optimizer(path, saved_keys, optim_sd)
        full: dict[str, Any] = {
            "model": model_sd,
            "optim": optim_sd,
            "train": "",
        }
        rng_key = f"rng_rank{_rank()}"
        if any(k.startswith(rng_key + ".") or k == rng_key for k in saved_keys):
            full[rng_key] = rng_state()
        try:
            dcp.load(full, checkpoint_id=str(path))
        # DCP raises several types (its CheckpointException is a BaseException); name the
        # checkpoint in every case
        except (Exception, dcp.CheckpointException) as err:
            raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(err)}") from err
        set_model_state_dict(model, full["model"])
        set_optimizer_state_dict(model, optimizer, full["optim"])
        train = json.loads(full["train"])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if rng_key in full and train["world_size"] == world:
            set_rng_state(full[rng_key])
        return TrainState(step=train["step"], consumed_tokens=train["consumed_tokens"],
                          bad_steps_total=train["bad_steps_total"], sampler=train["sampler"],
                          bad_in_row=train.get("bad_in_row", 0))


def _restarted() -> bool:
    """This process belongs to a worker group torchrun restarted, or to a requeued SLURM job."""
    return any(int(os.environ.get(k, "0") or 0) > 0
               for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def verify(path: Path) -> None:
    """Every file of checkpoint `path` against its checksum, before anything is unpickled;
    CheckpointError naming the file otherwise (every rank calls it)."""
    try:
        integrity.verify(path)
    except integrity.IntegrityError as err:
        raise CheckpointError(f"checkpoint {path} fails verification: {err}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if isinstance(err, dcp.CheckpointException) and text:
        return text[-1]  # a rank's traceback: its last line is the error
    return text[0] if text else type(err).__name__


def _check_shapes(path: Path, model_sd: dict[str, Any]) -> set[str]:
    """Refuse a checkpoint of another model shape, naming the first differing key.

    Returns the keys the checkpoint holds."""
    meta_file = path / ".metadata"
    if not meta_file.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: {meta_file} is missing")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: cannot read {meta_file}: {_first_line(err)}") from err
    saved = metadata.state_dict_metadata
    for key, value in model_sd.items():
        fqn = f"model.{key}"
        if fqn not in saved:
            raise CheckpointError(f"checkpoint {path} has no entry {fqn!r}: it was saved from a different model")
        want = tuple(value.shape)
        have = tuple(getattr(saved[fqn], "size", want))
        if have != want:
            raise CheckpointError(
                f"checkpoint {path}: {fqn!r} has shape {list(have)} but the model expects {list(want)} "
                "(incompatible model config)"
            )
    _check_files(path, metadata)
    return set(saved)


def _check_optimizer(path: Path, saved: set[str], optim_sd: dict[str, Any]) -> None:
    """Refuse a checkpoint without this optimizer's state (saved with another optim.name:
    AdamW's exp_avg / exp_avg_sq where Muon needs momentum_buffer, or the reverse)."""
    wanted = [(f"optim.state.{fqn}.{key}", f"state {fqn}.{key}")
              for fqn, state in optim_sd.get("state", {}).items() for key in state]
    wanted += [(f"optim.param_groups.{i}.{key}", f"group {i} entry {key!r}")
               for i, group in enumerate(optim_sd.get("param_groups", [])) for key in group
               if key != "params"]
    for key, what in wanted:
        if key not in saved:
            raise CheckpointError(
                f"checkpoint {path} has no optimizer {what}: it was saved with another "
                "optimizer; resume with the optim.name it was saved with")


def _check_files(path: Path, metadata: Any) -> None:
    """Every shard file the metadata points at must exist and be long enough."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
    for rel, size in needed.items():
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: shard file {f} is missing")
        if f.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: shard file {f} has {f.stat().st_size} bytes, "
                f"expected at least {size}"
            )
