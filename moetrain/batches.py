"""Show or save the token ids and text of the global batch of any training step, or of the
validation set, exactly as a run draws them.

    python -m moetrain.batches --run RUN_DIR --step N [--out FILE.jsonl]
    python -m moetrain.batches --run RUN_DIR --val [--out FILE.jsonl]
    python -m moetrain.batches +experiment=tiny --step N          (a config, no run yet)

`--step N` is the batch of metrics.jsonl's step N (1-based): the sampler is restored from the
run's newest checkpoint before that step (or started fresh from `train.seed`) and advanced, so
the batch is the one trained even across resumes with another mixture, as long as a checkpoint
was written after the change. `--val` is every source's evaluation batches (moetrain/evaluation.py).
The run's config is its `config.yaml` (that of its latest start); the data is its prepared
directory, checked as training checks it.

Without `--out`, one block per sequence is printed: the source, the sequence's index in it, the
first `--show-ids` ids and the decoded text (up to `--chars` characters). `--out` writes one JSON
object per sequence with every id and the whole text: {"split", "step" | "batch", "position",
"source", "index", "ids", "text"}. Data-parallel rank r of dp trains rows
[r G/dp, (r+1) G/dp) of a global batch of G, in micro-batches of consecutive rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from moetrain.checkpoint import CheckpointError


def _config(run: Optional[Path], overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    from moetrain.config import compose, to_object, validate
    from moetrain.config.schema import MoetrainConfig

    if run is None:
        cfg = to_object(compose(overrides))
    else:
        path = run / "config.yaml"
        if not path.is_file():
            raise CheckpointError(f"--run {run}: {path} is missing (not a run directory)")
        merged = OmegaConf.merge(OmegaConf.structured(MoetrainConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _train_state(checkpoint: Path) -> dict:
    """The `train` entry (step, sampler state) of a checkpoint."""
    import torch.distributed.checkpoint as dcp

    holder = {"train": ""}
    try:
        dcp.load(holder, checkpoint_id=str(checkpoint))
    except Exception as err:  # DCP raises several types
        raise CheckpointError(f"cannot read the train state of {checkpoint}: {err}") from err
    return json.loads(holder["train"])


def _sampler_before(run: Optional[Path], cfg: Any, sizes: list[int], names: list[str],
                    weights: list[float], step: int):
    """A sampler whose next global batch is that of `step` (1-based)."""
    from moetrain.data import MixtureSampler

    t = cfg.train
    sampler = MixtureSampler(sizes, global_batch_size=t.global_batch_size,
                             micro_batch_size=t.global_batch_size, seed=t.seed, weights=weights,
                             names=names, on_exhausted=cfg.data.on_exhausted)
    done = 0
    if run is not None:
        steps = sorted((int(p.name.split("_")[1]), p) for p in (run / "checkpoints").glob("step_*")
                       if p.name.split("_")[1].isdigit() and (p / ".metadata").is_file())
        usable = [(s, p) for s, p in steps if s <= step - 1]
        if usable:
            done, path = usable[-1]
            state = _train_state(path)
            if state.get("sampler") is not None:
                sampler.load_state_dict(state["sampler"])
            else:
                done = 0
    for _ in range(step - 1 - done):
        sampler.next_global_batch()
    return sampler


def _rows(data: Any, indices: list[int], tokenizer: Any) -> Iterator[dict]:
    src, local = data.locate(indices)
    batch = data.get_batch(indices)
    for position, (s, i) in enumerate(zip(src.tolist(), local.tolist())):
        ids = batch[position].tolist()
        yield {"position": position, "source": data.names[s], "index": int(i), "ids": ids,
               "text": tokenizer.decode(ids)}


def batches(cfg: Any, run: Optional[Path], step: Optional[int], val: bool) -> Iterator[dict]:
    """The sequences asked for, as the dicts `--out` writes."""
    from moetrain.data import ensure_prepared, load_prepared_tokenizer, mixture_datasets
    from moetrain.evaluation import Evaluator

    prepared = ensure_prepared(cfg.data, cfg.model.vocab_size)
    tokenizer = load_prepared_tokenizer(prepared)
    train, val_data = mixture_datasets(prepared, cfg.data, cfg.train.eval_batches if val else 0)
    if step is not None:
        sampler = _sampler_before(run, cfg, train.sizes, train.names, train.weights, step)
        for row in _rows(train, sampler.next_global_batch().tolist(), tokenizer):
            yield {"split": "train", "step": step, **row}
    if val:
        cfg = copy.deepcopy(cfg)
        cfg.train.eval_every = max(cfg.train.eval_every, 1)  # the batches it would evaluate
        evaluator = Evaluator(val_data, cfg, dp_rank=0, dp_size=1)
        for name, steps in zip(evaluator.names, evaluator.steps):
            for k, micro_batches in enumerate(steps):
                indices = [i for mb in micro_batches for i in mb]
                for row in _rows(val_data, indices, tokenizer):
                    yield {"split": "val", "batch": k, **row}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moetrain.batches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides (with --run: on its config.yaml)")
    p.add_argument("--run", type=Path, help="a run directory (its config.yaml and checkpoints)")
    p.add_argument("--step", type=int, help="the global batch of this step (1-based)")
    p.add_argument("--val", action="store_true", help="the validation set's batches")
    p.add_argument("--out", type=Path, help="write every sequence as one JSON line here")
    p.add_argument("--chars", type=int, default=200, help="text shown per sequence (200)")
    p.add_argument("--show-ids", type=int, default=16, help="ids shown per sequence (16)")
    args = p.parse_args(argv)
    if args.step is None and not args.val:
        p.error("give --step N and/or --val")
    if args.step is not None and args.step < 1:
        p.error("--step is 1-based (metrics.jsonl's step)")

    from moetrain.config import ConfigError
    from moetrain.data import DataError, DataExhausted

    try:
        cfg = _config(args.run, args.overrides)
        rows = batches(cfg, args.run, args.step, args.val)
        out = args.out.open("w") if args.out else None
        n = 0
        for row in rows:
            n += 1
            if out is not None:
                out.write(json.dumps(row) + "\n")
                continue
            where = f"step {row['step']}" if row["split"] == "train" else f"val batch {row['batch']}"
            ids = " ".join(map(str, row["ids"][: args.show_ids]))
            more = " ..." if len(row["ids"]) > args.show_ids else ""
            print(f"--- {where} #{row['position']}: source {row['source']} sequence "
                  f"{row['index']} ({len(row['ids'])} ids: {ids}{more})")
            print(row["text"][: args.chars])
        if out is not None:
            out.close()
            print(f"wrote {n} sequences to {args.out}")
    except (ConfigError, DataError, DataExhausted, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
