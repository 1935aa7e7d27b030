#!/usr/bin/env python
"""Mutation check: put realistic one-line bugs into the model, MoE, trainer and checkpoint code,
one at a time, run the fast tests chosen for each, and report which bugs they miss.

    python scripts/mutation_check.py                        # every mutation; table on stdout
    python scripts/mutation_check.py --only router-bias-in-combine-weights --only capacity-floor
    python scripts/mutation_check.py --tests tests/oracle   # the same tests for every mutation
    python scripts/mutation_check.py --write docs/testing.md   # refresh the report in the docs
    python scripts/mutation_check.py --list

Each mutation replaces an exact `old` text (found exactly once in its file, else the script
stops before touching anything) by `new`, runs `python -m pytest -x` on its tests with a time
limit, and restores the file's original bytes in a `finally` (also on Ctrl-C, SIGTERM or a
timeout, whose test process group is killed). It refuses to run when a file it mutates has
uncommitted changes, so a restored file is always its committed self, and it checks that after
each mutation. Bytecode is not written (PYTHONDONTWRITEBYTECODE), so no stale mutated .pyc can
outlive a run. Before the mutations, the tests run once on the clean tree and must pass.

Exit status: 0 every mutation caught, 1 some survived (or the clean tests fail), 2 bad input.
Why not mutmut / cosmic-ray: they generate thousands of operator mutants over whole modules
(hours on this suite); this checks a curated list of bugs that matter, in minutes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- mutation-report:begin -->", "<!-- mutation-report:end -->"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest paths / node ids, run in this order with -x
    what: str  # the bug, in words


ORACLE = "tests/oracle"
KNOWN = "tests/oracle/test_known_bugs.py"
MUTATIONS: tuple[Mutation, ...] = (
    # -- the three bugs the equivalence harness could not see (issue 17)
    Mutation("global-counts-not-reset", "moetrain/model/moe/layer.py",
             "        self.lbl.reset()\n", "        pass\n", (KNOWN, ORACLE),
             "global-scope LBL counts carried over from the previous step"),
    Mutation("router-bias-in-combine-weights", "moetrain/model/moe/router.py",
             "topk_score_TK = scores_TE.gather(1, topk_idx_TK)",
             "topk_score_TK = (scores_TE + self.expert_bias).gather(1, topk_idx_TK)",
             (KNOWN, "tests/model/test_router.py", ORACLE),
             "combine weights from scores + expert bias"),
    Mutation("trainer-aux-scale-one", "moetrain/model/moe/control.py",
             "self.aux_loss_scale = 1.0 / micro_batches_per_step",
             "self.aux_loss_scale = 1.0", (KNOWN, ORACLE),
             "each micro-batch's aux losses weighted 1 instead of 1 / micro-batches"),
    # -- router
    Mutation("router-bias-ignored", "moetrain/model/moe/router.py",
             "select_TE = scores_TE + self.expert_bias",
             "select_TE = scores_TE", ("tests/model/test_routing_variants.py", ORACLE),
             "expert bias not used for selection"),
    Mutation("router-bias-direction", "moetrain/model/moe/router.py",
             "torch.sign(load_E.sum() - E * load_E)", "torch.sign(E * load_E - load_E.sum())",
             ("tests/model/test_routing_variants.py", ORACLE),
             "bias raised for over-loaded experts"),
    Mutation("router-norm-over-all-experts", "moetrain/model/moe/router.py",
             "weight_TK = topk_score_TK / counted_TK.sum(-1, keepdim=True).clamp_min(1e-20)",
             "weight_TK = topk_score_TK / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)",
             ("tests/model/test_router.py", ORACLE),
             "norm_topk_prob divides by all experts' scores, not the selected ones'"),
    Mutation("router-top-p-counts-own-prob", "moetrain/model/moe/router.py",
             "before_TK = torch.cumsum(probs_TK, dim=-1) - probs_TK",
             "before_TK = torch.cumsum(probs_TK, dim=-1)",
             ("tests/model/test_routing_variants.py", ORACLE),
             "top-p threshold includes the assignment's own probability"),
    # -- losses
    Mutation("z-loss-square-of-mean", "moetrain/model/moe/losses.py",
             "torch.logsumexp(logits_TE, dim=-1).square().mean()",
             "torch.logsumexp(logits_TE, dim=-1).mean().square()",
             ("tests/model/test_losses.py", ORACLE), "z-loss squares the mean logsumexp"),
    Mutation("lbl-p-over-assignments", "moetrain/model/moe/losses.py",
             "p_E = probs_TE.sum(0) / max(T, 1)", "p_E = probs_TE.sum(0) / max(T * K, 1)",
             ("tests/model/test_losses.py", ORACLE), "LBL's p_i averaged over T k, not T"),
    Mutation("lbl-seq-sum-over-sequences", "moetrain/model/moe/losses.py",
             "_FrozenWeightSum.apply(p_BE, f_BE / max(B, 1))", "_FrozenWeightSum.apply(p_BE, f_BE)",
             ("tests/model/test_losses.py", ORACLE),
             "seq-scope LBL summed, not averaged, over sequences"),
    Mutation("lbl-global-running-counts-unused", "moetrain/model/moe/losses.py",
             "counts = self.step_counts_E.clone()", "counts = counts.clone()",
             ("tests/model/test_losses.py", ORACLE), "global scope uses the micro-batch's counts"),
    Mutation("lbl-recompute-accumulates", "moetrain/model/moe/losses.py",
             "        if not in_backward():\n            counts = self.sum_counts(counts)",
             "        if True:\n            counts = self.sum_counts(counts)",
             ("tests/model/test_moe_layer.py", ORACLE),
             "an activation-checkpoint recompute adds its counts again"),
    Mutation("aux-backward-scale-ignored", "moetrain/model/moe/losses.py",
             "torch.full((), ctx.scale, dtype=dtype, device=device)",
             "torch.full((), 1.0, dtype=dtype, device=device)",
             ("tests/model/test_losses.py", ORACLE), "AttachAuxLoss ignores its scale"),
    # -- capacity and dispatcher
    Mutation("capacity-floor", "moetrain/model/moe/capacity.py",
             "return math.ceil(capacity_factor * num_tokens * top_k / num_experts)",
             "return int(capacity_factor * num_tokens * top_k / num_experts)",
             ("tests/model/test_moe_layer.py", ORACLE), "capacity rounded down"),
    Mutation("capacity-keeps-lowest-scores", "moetrain/model/moe/capacity.py",
             "priority_TK.detach().reshape(-1), descending=True",
             "priority_TK.detach().reshape(-1), descending=False",
             ("tests/model/test_moe_layer.py", ORACLE),
             "capacity keeps the lowest-score assignments"),
    Mutation("dispatcher-drops-ignored", "moetrain/model/moe/dispatcher.py",
             "expert_A = expert_A.masked_fill(~routing.keep_TK.reshape(-1), E)",
             "expert_A = expert_A.masked_fill(~routing.keep_TK.reshape(-1), 0)",
             ("tests/model/test_dispatcher.py", "tests/model/test_moe_layer.py", ORACLE),
             "dropped assignments dispatched to expert 0 instead of left out"),
    Mutation("dispatcher-unweighted-combine", "moetrain/kernels/reference.py",
             "y_TD = (rows_TKD.float() * w_TK.unsqueeze(-1)).sum(1)",
             "y_TD = rows_TKD.float().sum(1)", ("tests/model/test_dispatcher.py", ORACLE),
             "expert outputs summed without their combine weights"),
    # -- dense model
    Mutation("attention-not-causal", "moetrain/model/attention.py",
             "is_causal=True", "is_causal=False", ("tests/model/test_attention.py", ORACLE),
             "attention sees future tokens"),
    Mutation("rmsnorm-sum-not-mean", "moetrain/model/norm.py",
             "x32.pow(2).mean(-1, keepdim=True)", "x32.pow(2).sum(-1, keepdim=True)",
             ("tests/model/test_norm_rope.py", ORACLE), "RMSNorm over the sum of squares"),
    Mutation("rope-rotation-reversed", "moetrain/model/rope.py",
             "rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)",
             "rotated = torch.cat([x32[..., half:], -x32[..., :half]], dim=-1)",
             ("tests/model/test_norm_rope.py", ORACLE), "RoPE rotates the other way"),
    Mutation("transformer-extra-dense-layer", "moetrain/model/transformer.py",
             "dense = layer_id < cfg.moe.first_dense_layers",
             "dense = layer_id <= cfg.moe.first_dense_layers",
             ("tests/model/test_transformer.py", ORACLE), "one dense layer too many"),
    # -- trainer, optimizer, clipping, metrics
    Mutation("trainer-schedule-off-by-one", "moetrain/trainer.py",
             "routing = self.moe.start_step(self.state.step)",
             "routing = self.moe.start_step(self.state.step + 1)", (ORACLE,),
             "sparsity schedules read one step ahead"),
    Mutation("lm-loss-per-micro-batch-mean", "moetrain/parallel/step.py",
             "(loss_sum / tokens_per_step).backward()", "(loss_sum / targets.numel()).backward()",
             (ORACLE,), "each micro-batch's LM loss backpropagated as its own mean"),
    Mutation("optim-warmup-from-zero", "moetrain/optim/__init__.py",
             "return cfg.lr * (step + 1) / cfg.warmup_steps",
             "return cfg.lr * step / cfg.warmup_steps",
             ("tests/test_optim.py", ORACLE), "first step with learning rate 0"),
    Mutation("optim-decay-on-norms", "moetrain/optim/__init__.py",
             "return param.ndim >= 2 and not name.endswith(\".bias\")",
             "return not name.endswith(\".bias\")", ("tests/test_optim.py", ORACLE),
             "weight decay on norm gains"),
    Mutation("clip-never-clips", "moetrain/parallel/grad_norm.py",
             "min(1.0, max_norm / (total_norm + 1e-6))",
             "max(1.0, max_norm / (total_norm + 1e-6))",
             ("tests/parallel/test_grad_norm.py", ORACLE), "clipping scales up, never down"),
    Mutation("metrics-lbl-not-averaged", "moetrain/metrics/routing.py",
             "lbl, z = stats.scalar(\"lbl\") / micro_batches,", "lbl, z = stats.scalar(\"lbl\"),",
             ("tests/metrics/test_routing.py", ORACLE),
             "logged aux_loss summed over micro-batches"),
    # -- Muon and QK-clip (docs/optimizers.md)
    Mutation("muon-newton-schulz-on-shards", "moetrain/parallel/whole_matrices.py",
             "if m.owner == self.rank and mine and len(m.pieces) == 1 and _whole(mine[0], m):",
             "if mine:", ("tests/parallel/test_whole_matrices.py",),
             "each rank orthogonalises its own shard of a matrix (PaddleFleet#1703)"),
    Mutation("muon-original-scale", "moetrain/optim/muon.py",
             "return 0.2 * math.sqrt(max(m, n))", "return math.sqrt(max(1, m / n))",
             ("tests/test_optim.py", ORACLE), "torch's 'original' update scale, not AdamW's RMS"),
    Mutation("muon-no-nesterov", "moetrain/optim/muon.py",
             "update = g.lerp(buf, mu) if group[\"nesterov\"] else buf", "update = buf",
             ("tests/test_optim.py", ORACLE), "Nesterov momentum ignored"),
    Mutation("muon-planned-state-bytes", "moetrain/optim/__init__.py",
             "return MUON_STATE_BYTES if muon else ADAMW_STATE_BYTES",
             "return ADAMW_STATE_BYTES",
             ("tests/test_optim.py", "tests/test_plan.py"),
             "the planner counts AdamW's two moments for Muon's matrices"),
    Mutation("qk-clip-gqa-query-sqrt", "moetrain/model/attention.py",
             "eta_q = eta_H / eta_k.repeat_interleave(H // K)", "eta_q = eta_H.sqrt()",
             (ORACLE,), "GQA query heads scaled by sqrt(eta) whatever their shared key's scale"),
    # -- checkpoints
    Mutation("checkpoint-bias-not-saved", "moetrain/model/moe/router.py",
             "torch.zeros(slots), persistent=True", "torch.zeros(slots), persistent=False",
             ("tests/checkpoint/test_convert.py", ORACLE), "expert bias missing from checkpoints"),
    Mutation("checkpoint-sampler-lost", "moetrain/checkpoint/manager.py",
             "sampler=train[\"sampler\"]", "sampler=None",
             ("tests/checkpoint/test_manager.py", ORACLE), "resume restarts the data order"),
    Mutation("checkpoint-rng-not-restored", "moetrain/checkpoint/manager.py",
             "train[\"world_size\"] == world", "train[\"world_size\"] != world",
             ("tests/checkpoint/test_manager.py",), "RNG state not restored at the same layout"),
    Mutation("checkpoint-prune-keeps-one-more", "moetrain/checkpoint/manager.py",
             "steps[: max(0, len(steps) - self.keep_last)]",
             "steps[: max(0, len(steps) - self.keep_last - 1)]",
             ("tests/checkpoint/test_manager.py",), "keep_last keeps one checkpoint too many"),
    # -- nothing silent (issue 22): the wrong data, tokenizer, model or directory
    Mutation("source-reused-by-name", "moetrain/data/prepare.py",
             "        _check_same_source(s, entry, raw, target, fix)\n", "        pass\n",
             ("tests/data/test_prepare.py::test_a_source_is_reused_only_for_the_path_and_field_it_was_prepared_from",),
             "a cached source of the same name trained on instead of the configured path"),
    Mutation("resume-architecture-not-compared", "moetrain/checkpoint/identity.py",
             "for k in sorted(saved.keys() & mine.keys()) if saved[k] != mine[k]]",
             "for k in sorted(saved.keys() & mine.keys()) if False]",
             ("tests/checkpoint/test_identity.py",),
             "a checkpoint of another architecture with equal shapes resumed"),
    Mutation("hf-other-tokenizer-accepted", "moetrain/hf/tokenizer.py",
             "if source is None or cfg.model.init.allow_other_tokenizer:", "if True:",
             ("tests/hf/test_export_trained_model.py::test_another_tokenizer_than_the_hugging_face_models_is_refused_unless_allowed",),
             "continued pretraining on another tokenizer's ids"),
    Mutation("run-dir-lock-not-checked", "moetrain/runlock.py",
             "            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)\n", "            pass\n",
             ("tests/test_runlock.py",), "a second run on a live run directory"),
    Mutation("orphans-outlive-their-launcher", "moetrain/rank_exit.py",
             "while os.getppid() == launcher:", "while True:",
             ("tests/e2e/test_torchrun_resume.py",), "ranks keep training after kill -9 of torchrun"),
    Mutation("launcher-prints-torchruns-report", "moetrain/launcher_exit.py",
             "ONE_LINE_CODES = (2, 130)", "ONE_LINE_CODES = ()",
             ("tests/test_launcher_exit.py",), "a refused start is 40 lines and exit 1"),
    Mutation("export-top-k-of-the-next-step", "moetrain/trainer.py",
             '"routing": self.routing,',
             '"routing": {**self.routing, "top_k": top_k_at(self.cfg.model.moe, self.state.step)},',
             ("tests/hf/test_export_trained_model.py::test_the_export_has_the_runs_eos_and_trained_top_k_and_its_loss",),
             "the export's top-k is the schedule's after the step the weights were trained at"),
    Mutation("export-eos-from-the-files-only", "moetrain/hf/export.py",
             "special = {} if given_tokenizer else", "special = {} if True else",
             ("tests/hf/test_export_trained_model.py::test_the_export_has_the_runs_eos_and_trained_top_k_and_its_loss",),
             "a bare tokenizer.json exported without EOS"),
    Mutation("metrics-bare-nan", "moetrain/metrics/sinks.py",
             'self._file.write(strict_json(record) + "\\n")', 'self._file.write(json.dumps(record) + "\\n")',
             ("tests/test_trainer.py::test_a_nan_step_is_skipped_counted_and_training_goes_on",),
             "metrics.jsonl writes NaN (not JSON)"),
    Mutation("failing-step-record-lost", "moetrain/trainer.py",
             "failing = bad_in_row >= t.max_bad_steps  # logged first, then raised",
             "failing = bad_in_row >= t.max_bad_steps\n                if failing:\n"
             "                    raise TrainingError('too many bad steps')",
             ("tests/test_trainer.py::test_too_many_bad_steps_in_a_row_abort_with_a_clear_message",),
             "the record of the step that stops the run is lost"),
    Mutation("val-loss-ignores-mixture-weights", "moetrain/evaluation.py",
             "sum(w * losses[n] for n, w in", "sum(losses[n] for n, w in",
             ("tests/test_trainer.py::test_a_mixture_logs_each_sources_validation_loss_and_the_mfu",),
             "val_loss not the mixture-weighted mean of the sources' losses"),
)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | survived | timeout | error (pytest could not run the tests)
    test: str  # the first failing test ("" when none)
    seconds: float


class UserError(Exception):
    """Bad input: exit 2 with the message."""


def _on_signal(signum, frame):  # SIGTERM / SIGHUP -> KeyboardInterrupt, so `finally` restores
    raise KeyboardInterrupt(f"signal {signum}")


def check_mutations(mutations: Sequence[Mutation], root: Path) -> None:
    """Every mutation applies: its file exists and holds `old` exactly once; names unique."""
    names = [m.name for m in mutations]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"duplicate mutation names: {twice}")
    for m in mutations:
        path = root / m.path
        if not path.is_file():
            raise UserError(f"mutation {m.name}: no file {m.path}")
        count = path.read_text().count(m.old)
        if count != 1 or m.old == m.new:
            raise UserError(f"mutation {m.name}: its old text occurs {count} times in {m.path} "
                            "(must be exactly once, and differ from the new text); update the list")


def dirty_files(paths: Sequence[str], root: Path) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *sorted(set(paths))], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def run_tests(tests: Sequence[str], root: Path, timeout: float, python: str) -> tuple[str, str]:
    """(status, first failing test) of `pytest -x` over `tests`."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [python, "-B", "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", ""
    finally:
        if proc.poll() is None:  # interrupted: take the test processes down with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    failed = [line.split(" - ")[0].split(" ", 1)[1] for line in output.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if proc.returncode == 0:
        return "survived", ""
    if proc.returncode == 1 and failed:
        return "caught", failed[0]
    tail = " | ".join(output.strip().splitlines()[-3:])
    return "error", f"pytest exit {proc.returncode}: {tail}"


def apply_and_test(m: Mutation, root: Path, timeout: float, python: str,
                   tests: Optional[Sequence[str]] = None) -> Outcome:
    path = root / m.path
    original = path.read_bytes()
    start = time.monotonic()
    try:
        path.write_bytes(original.replace(m.old.encode(), m.new.encode(), 1))
        status, test = run_tests(tests or m.tests, root, timeout, python)
    finally:
        path.write_bytes(original)
    if path.read_bytes() != original:  # pragma: no cover - a disk that lies
        raise RuntimeError(f"{m.path} was not restored")
    return Outcome(m, status, test, time.monotonic() - start)


def report(outcomes: Sequence[Outcome], header: str) -> str:
    rows = [header, "",
            "| mutation | file | bug | caught by | s |", "|---|---|---|---|---|"]
    for o in outcomes:
        caught = {"caught": f"`{o.test}`", "survived": "**SURVIVED**",
                  "timeout": "timeout", "error": f"error: {o.test}"}[o.status]
        rows.append(f"| `{o.mutation.name}` | `{o.mutation.path}` | {o.mutation.what} | {caught} "
                    f"| {o.seconds:.0f} |")
    caught = sum(o.status in ("caught", "timeout") for o in outcomes)
    rows += ["", f"{caught} of {len(outcomes)} mutations caught."]
    return "\n".join(rows)


def write_report(doc: Path, text: str) -> None:
    content = doc.read_text()
    if content.count(BEGIN) != 1 or content.count(END) != 1:
        raise UserError(f"--write {doc}: needs one {BEGIN} and one {END} line to replace between")
    head, rest = content.split(BEGIN)
    _, tail = rest.split(END)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def run(mutations: Sequence[Mutation], root: Path, *, timeout: float, python: str,
        tests: Optional[Sequence[str]] = None, baseline: bool = True,
        log=print) -> list[Outcome]:
    check_mutations(mutations, root)
    dirty = dirty_files([m.path for m in mutations], root)
    if dirty:
        raise UserError(f"uncommitted changes in {', '.join(dirty)}: commit or stash them first "
                        "(each mutated file is restored to its committed content)")
    if baseline:
        selected = list(tests or dict.fromkeys(t for m in mutations for t in m.tests))
        status, test = run_tests(selected, root, timeout * 2, python)
        if status != "survived":  # "survived" = all passed
            raise RuntimeError(f"the tests fail without any mutation ({status} {test}); "
                               "fix that first")
    outcomes = []
    for m in mutations:
        outcome = apply_and_test(m, root, timeout, python, tests)
        log(f"{m.name:40s} {outcome.status:8s} {outcome.seconds:6.1f}s  {outcome.test}")
        outcomes.append(outcome)
    still_dirty = dirty_files([m.path for m in mutations], root)
    assert not still_dirty, f"not restored: {still_dirty}"
    return outcomes


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this mutation (repeatable)")
    ap.add_argument("--tests", nargs="+", metavar="PATH",
                    help="run these tests for every mutation instead of each one's own")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    ap.add_argument("--write", type=Path, metavar="DOC",
                    help=f"replace the report between {BEGIN} and {END} in DOC")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the tests once on the clean tree first")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            raise UserError(f"--only {sorted(unknown)}: no such mutation (see --list)")
        if args.write is not None and not args.write.is_file():
            raise UserError(f"--write {args.write}: no such file")
        chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
        if args.list:
            check_mutations(chosen, ROOT)
            for m in chosen:
                print(f"{m.name:40s} {m.path:36s} {m.what}")
            return 0
        start = time.monotonic()
        outcomes = run(chosen, ROOT, timeout=args.timeout, python=sys.executable,
                       tests=args.tests, baseline=not args.no_baseline)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    import torch  # only for the record of the version

    which = f"`--tests {' '.join(args.tests)}`" if args.tests else "each mutation's own tests"
    text = report(outcomes, f"Commit `{commit}`, torch {torch.__version__}, {which}, "
                            f"{time.monotonic() - start:.0f} s in all (2-core CPU machine).")
    print(text)
    if args.write is not None:
        write_report(args.write, text)
    return 0 if all(o.status in ("caught", "timeout") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
