#!/usr/bin/env python
"""Mutation check: put realistic one-line bugs into the model, MoE, trainer and checkpoint code,
one at a time, run the fast tests chosen for each, and report which bugs they miss.

    python scripts/mutation_check.py                        # every mutation; table on stdout
    python scripts/mutation_check.py --only router-bias-in-combine-weights --only capacity-floor
    python scripts/mutation_check.py --tests tests/oracle   # the same tests for every mutation
    python scripts/mutation_check.py --write-run-table docs/testing.md   # run them all (~30 min),
                                                           # their table into the docs
    python scripts/mutation_check.py --list
    python scripts/mutation_check.py --only NAME --record    # merge the outcomes into RESULTS
    python scripts/mutation_check.py --keys                  # key -> mutation -> catching test
    python scripts/mutation_check.py --report docs/testing.md   # that table into the docs

The key-coverage sweep (issue 29): every leaf key of the config schema is classified, as a
MATH key (its value changes what is computed; some mutation here names it in `keys=` and a
recorded run shows a test catching that mutation) or under a NOT_MATH prefix with the reason.
A key in neither stops the script with one line naming it (tests/test_mutation_check.py fails
the same way, so a branch that adds config keys must classify them). `--keys` / `--report`
build the table from MUTATIONS and the recorded outcomes (RESULTS, written by `--record`, so
runs of a few mutations at a time add up); every math key without a caught, current record is
a failing line, and the exit status is then 1.

Each mutation replaces an exact `old` text (found exactly once in its file, else the script
stops before touching anything) by `new`, runs `python -m pytest -x` on its tests with a time
limit, and restores the file's original bytes in a `finally` (also on Ctrl-C, SIGTERM or a
timeout, whose test process group is killed). It refuses to run when a file it mutates has
uncommitted changes, so a restored file is always its committed self, and it checks that after
each mutation. Bytecode is not written (PYTHONDONTWRITEBYTECODE), so no stale mutated .pyc can
outlive a run. Before the mutations, the tests run once on the clean tree and must pass.

Exit status: 0 every mutation caught (every math key covered, for --keys / --report),
1 some survived or a key is uncovered (or the clean tests fail), 2 bad input or an
unclassified config key.
Why not mutmut / cosmic-ray: they generate thousands of operator mutants over whole modules
(hours on this suite); this checks a curated list of bugs that matter, in minutes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- mutation-report:begin -->", "<!-- mutation-report:end -->"
KEYS_BEGIN, KEYS_END = "<!-- key-coverage:begin -->", "<!-- key-coverage:end -->"
RESULTS = ROOT / "docs" / "mutation_results.json"  # the recorded outcomes (--record)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest paths / node ids, run in this order with -x
    what: str  # the bug, in words
    # The config keys (MATH_KEYS) whose effect the bug drops or bends (the key-coverage sweep).
    keys: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """Identifies what was run: a record of another text or other tests is stale."""
        text = "\0".join((self.path, self.old, self.new, *self.tests))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


ORACLE = "tests/oracle"
DOCUMENTS = "tests/model/test_documents.py"
MTP_ORACLE = ("tests/oracle/test_oracle.py::"
              "test_trainer_with_mtp_and_documents_equals_the_independent_reference")
KNOWN = "tests/oracle/test_known_bugs.py"
MUON_ORACLE = ("tests/oracle/test_oracle.py::"
               "test_trainer_equals_the_independent_reference[muon-plain-momentum-recompute]")
MUTATIONS: tuple[Mutation, ...] = (
    # -- the three bugs the equivalence harness could not see (issue 17)
    Mutation("global-counts-not-reset", "moetrain/model/moe/layer.py",
             "        self.lbl.reset()\n", "        pass\n", (KNOWN, ORACLE),
             "global-scope LBL counts carried over from the previous step",
             keys=('model.moe.lbl.scope',)),
    Mutation("router-bias-in-combine-weights", "moetrain/model/moe/router.py",
             "topk_score_TK = scores_TE.gather(1, topk_idx_TK)",
             "topk_score_TK = (scores_TE + self.expert_bias).gather(1, topk_idx_TK)",
             (KNOWN, "tests/model/test_router.py", ORACLE),
             "combine weights from scores + expert bias",
             keys=('model.moe.routing.bias_rate',)),
    Mutation("trainer-aux-scale-one", "moetrain/model/moe/control.py",
             "self.aux_loss_scale = 1.0 / micro_batches_per_step",
             "self.aux_loss_scale = 1.0", (KNOWN, ORACLE),
             "each micro-batch's aux losses weighted 1 instead of 1 / micro-batches",
             keys=('train.micro_batch_size',)),
    # -- router
    Mutation("router-bias-ignored", "moetrain/model/moe/router.py",
             "select_TE = scores_TE + self.expert_bias",
             "select_TE = scores_TE", ("tests/model/test_routing_variants.py", ORACLE),
             "expert bias not used for selection",
             keys=('model.moe.routing.bias_rate',)),
    Mutation("router-bias-direction", "moetrain/model/moe/router.py",
             "torch.sign(load_E.sum() - E * load_E)", "torch.sign(E * load_E - load_E.sum())",
             ("tests/model/test_routing_variants.py", ORACLE),
             "bias raised for over-loaded experts",
             keys=('model.moe.routing.bias_rate',)),
    Mutation("router-norm-over-all-experts", "moetrain/model/moe/router.py",
             "weight_TK = topk_score_TK / counted_TK.sum(-1, keepdim=True).clamp_min(1e-20)",
             "weight_TK = topk_score_TK / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)",
             ("tests/model/test_router.py", ORACLE),
             "norm_topk_prob divides by all experts' scores, not the selected ones'",
             keys=('model.moe.norm_topk_prob',)),
    Mutation("router-top-p-counts-own-prob", "moetrain/model/moe/router.py",
             "before_TK = torch.cumsum(probs_TK, dim=-1) - probs_TK",
             "before_TK = torch.cumsum(probs_TK, dim=-1)",
             ("tests/model/test_routing_variants.py", ORACLE),
             "top-p threshold includes the assignment's own probability",
             keys=('model.moe.routing.top_p',)),
    # -- losses
    Mutation("z-loss-square-of-mean", "moetrain/model/moe/losses.py",
             "torch.logsumexp(logits_TE, dim=-1).square().mean()",
             "torch.logsumexp(logits_TE, dim=-1).mean().square()",
             ("tests/model/test_losses.py", ORACLE), "z-loss squares the mean logsumexp",
             keys=('model.moe.z_loss_coeff',)),
    Mutation("lbl-p-over-assignments", "moetrain/model/moe/losses.py",
             "p_E = probs_TE.sum(0) / max(T, 1)", "p_E = probs_TE.sum(0) / max(T * K, 1)",
             ("tests/model/test_losses.py", ORACLE), "LBL's p_i averaged over T k, not T",
             keys=('model.moe.lbl.coeff',)),
    Mutation("lbl-seq-sum-over-sequences", "moetrain/model/moe/losses.py",
             "_FrozenWeightSum.apply(p_BE, f_BE / max(B, 1))", "_FrozenWeightSum.apply(p_BE, f_BE)",
             ("tests/model/test_losses.py", ORACLE),
             "seq-scope LBL summed, not averaged, over sequences",
             keys=('model.moe.lbl.scope',)),
    Mutation("lbl-global-running-counts-unused", "moetrain/model/moe/losses.py",
             "counts = self.step_counts_E.clone()", "counts = counts.clone()",
             ("tests/model/test_losses.py", ORACLE), "global scope uses the micro-batch's counts",
             keys=('model.moe.lbl.scope',)),
    Mutation("lbl-recompute-accumulates", "moetrain/model/moe/losses.py",
             "        if not in_backward():\n            counts = self.sum_counts(counts)",
             "        if True:\n            counts = self.sum_counts(counts)",
             ("tests/model/test_moe_layer.py", ORACLE),
             "an activation-checkpoint recompute adds its counts again",
             keys=('train.recompute',)),
    Mutation("aux-backward-scale-ignored", "moetrain/model/moe/losses.py",
             "torch.full((), ctx.scale, dtype=dtype, device=device)",
             "torch.full((), 1.0, dtype=dtype, device=device)",
             ("tests/model/test_losses.py", ORACLE), "AttachAuxLoss ignores its scale"),
    # -- capacity and dispatcher
    Mutation("capacity-floor", "moetrain/model/moe/capacity.py",
             "return math.ceil(capacity_factor * num_tokens * top_k / num_experts)",
             "return int(capacity_factor * num_tokens * top_k / num_experts)",
             ("tests/model/test_moe_layer.py", ORACLE), "capacity rounded down",
             keys=('model.moe.capacity_factor',)),
    Mutation("capacity-keeps-lowest-scores", "moetrain/model/moe/capacity.py",
             "priority_TK.detach().reshape(-1), descending=True",
             "priority_TK.detach().reshape(-1), descending=False",
             ("tests/model/test_moe_layer.py", ORACLE),
             "capacity keeps the lowest-score assignments",
             keys=('model.moe.capacity_factor',)),
    Mutation("dispatcher-drops-ignored", "moetrain/model/moe/dispatcher.py",
             "expert_A = expert_A.masked_fill(~routing.keep_TK.reshape(-1), E)",
             "expert_A = expert_A.masked_fill(~routing.keep_TK.reshape(-1), 0)",
             ("tests/model/test_dispatcher.py", "tests/model/test_moe_layer.py", ORACLE),
             "dropped assignments dispatched to expert 0 instead of left out",
             keys=('model.moe.capacity_factor',)),
    Mutation("dispatcher-unweighted-combine", "moetrain/kernels/reference.py",
             "y_TD = (rows_TKD.float() * w_TK.unsqueeze(-1)).sum(1)",
             "y_TD = rows_TKD.float().sum(1)", ("tests/model/test_dispatcher.py", ORACLE),
             "expert outputs summed without their combine weights",
             keys=('model.moe.top_k',)),
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
             "moe_index=None if i < first_moe else i - first_moe",
             "moe_index=None if i <= first_moe else i - first_moe",
             ("tests/model/test_transformer.py", ORACLE), "one dense layer too many",
             keys=('model.moe.first_dense_layers',)),
    # -- trainer, optimizer, clipping, metrics
    Mutation("trainer-schedule-off-by-one", "moetrain/trainer.py",
             "routing = self.moe.start_step(self.state.step)",
             "routing = self.moe.start_step(self.state.step + 1)", (ORACLE,),
             "sparsity schedules read one step ahead",
             keys=('model.moe.schedule.top_k.kind', 'model.moe.schedule.capacity_factor.kind')),
    Mutation("lm-loss-per-micro-batch-mean", "moetrain/parallel/loss.py",
             "return loss / self.tokens_per_step", "return loss / main_targets.numel()",
             (ORACLE,), "each micro-batch's LM loss backpropagated as its own mean",
             keys=('train.global_batch_size', 'train.micro_batch_size')),
    Mutation("optim-warmup-from-zero", "moetrain/optim/__init__.py",
             "return cfg.lr * (step + 1) / cfg.warmup_steps",
             "return cfg.lr * step / cfg.warmup_steps",
             ("tests/test_optim.py", ORACLE), "first step with learning rate 0",
             keys=('optim.warmup_steps', 'optim.lr')),
    Mutation("optim-decay-on-norms", "moetrain/optim/__init__.py",
             "return param.ndim >= 2 and not name.endswith(\".bias\")",
             "return not name.endswith(\".bias\")", ("tests/test_optim.py", ORACLE),
             "weight decay on norm gains",
             keys=('optim.weight_decay',)),
    Mutation("clip-never-clips", "moetrain/parallel/grad_norm.py",
             "min(1.0, max_norm / (total_norm + 1e-6))",
             "max(1.0, max_norm / (total_norm + 1e-6))",
             ("tests/parallel/test_grad_norm.py", ORACLE), "clipping scales up, never down",
             keys=('optim.grad_clip',)),
    Mutation("metrics-lbl-not-averaged", "moetrain/metrics/routing.py",
             "lbl, z = stats.scalar(\"lbl\") / micro_batches,", "lbl, z = stats.scalar(\"lbl\"),",
             ("tests/metrics/test_routing.py", ORACLE),
             "each layer's logged lbl summed over micro-batches"),
    Mutation("step-lbl-not-averaged", "moetrain/model/moe/losses.py",
             '    return stats.scalar("lbl") / micro_batches\n', '    return stats.scalar("lbl")\n',
             ("tests/metrics/test_routing.py", ORACLE), "logged aux_loss summed over micro-batches"),
    # -- Muon and QK-clip (docs/optimizers.md)
    Mutation("muon-newton-schulz-on-shards", "moetrain/parallel/whole_matrices.py",
             "if m.owner == self.rank and mine and len(m.pieces) == 1 and _whole(mine[0], m):",
             "if mine:", ("tests/parallel/test_whole_matrices.py",),
             "each rank orthogonalises its own shard of a matrix (PaddleFleet#1703)",
             keys=("optim.name",)),
    Mutation("muon-original-scale", "moetrain/optim/muon.py",
             "return 0.2 * math.sqrt(max(m, n))", "return math.sqrt(max(1, m / n))",
             ("tests/test_optim.py", ORACLE), "torch's 'original' update scale, not AdamW's RMS",
             keys=("optim.name",)),
    Mutation("muon-no-nesterov", "moetrain/optim/muon.py",
             "update = g.lerp(buf, mu) if group[\"nesterov\"] else buf", "update = buf",
             ("tests/test_optim.py", ORACLE), "Nesterov momentum ignored",
             keys=("optim.nesterov",)),
    Mutation("muon-momentum-fixed", "moetrain/optim/muon.py",
             'lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]',
             'lr, wd, mu = group["lr"], group["weight_decay"], 0.95',
             (MUON_ORACLE,), "Muon's momentum fixed at the default 0.95",
             keys=("optim.momentum",)),
    Mutation("muon-ns-steps-fixed", "moetrain/optim/muon.py",
             'steps, coefficients, eps = group["ns_steps"],',
             'steps, coefficients, eps = 5,',
             (MUON_ORACLE,), "Newton-Schulz always 5 steps", keys=("optim.ns_steps",)),
    Mutation("muon-ns-dtype-ignored", "moetrain/optim/__init__.py",
             'ns_dtype=torch.float32 if cfg.ns_dtype == "fp32" else torch.bfloat16,',
             "ns_dtype=torch.bfloat16,", ("tests/test_optim.py",),
             "optim.ns_dtype=fp32 runs Newton-Schulz in bf16", keys=("optim.ns_dtype",)),
    Mutation("muon-planned-state-bytes", "moetrain/optim/__init__.py",
             "return MUON_STATE_BYTES if muon else ADAMW_STATE_BYTES",
             "return ADAMW_STATE_BYTES",
             ("tests/test_optim.py", "tests/test_plan.py"),
             "the planner counts AdamW's two moments for Muon's matrices",
             keys=("optim.name",)),
    Mutation("qk-clip-gqa-query-sqrt", "moetrain/model/attention.py",
             "eta_q = eta_H / eta_k.repeat_interleave(H // K)", "eta_q = eta_H.sqrt()",
             (ORACLE,), "GQA query heads scaled by sqrt(eta) whatever their shared key's scale",
             keys=("optim.qk_clip_threshold",)),
    Mutation("qk-clip-max-logits-across-documents", "moetrain/model/attention.py",
             "            if doc_positions is None:\n                visible",
             "            if True:\n                visible",
             ("tests/model/test_max_logits.py", "tests/oracle/test_oracle.py::test_trainer_with_mtp_"
              "and_documents_equals_the_independent_reference[mtp1-muon-qk-clip-documents]"),
             "QK-clip's largest logits taken over keys of other documents (data.document_mask)",
             keys=("optim.qk_clip_threshold", "data.document_mask")),
    # -- checkpoints
    Mutation("checkpoint-bias-not-saved", "moetrain/model/moe/router.py",
             "torch.zeros(slots), persistent=True", "torch.zeros(slots), persistent=False",
             ("tests/checkpoint/test_convert.py", ORACLE), "expert bias missing from checkpoints",
             keys=('checkpoint.resume',)),
    Mutation("checkpoint-sampler-lost", "moetrain/checkpoint/manager.py",
             "sampler=train[\"sampler\"]", "sampler=None",
             ("tests/checkpoint/test_manager.py", ORACLE), "resume restarts the data order",
             keys=('checkpoint.resume',)),
    Mutation("checkpoint-rng-not-restored", "moetrain/checkpoint/manager.py",
             "train[\"world_size\"] == world", "train[\"world_size\"] != world",
             ("tests/checkpoint/test_manager.py",), "RNG state not restored at the same layout"),
    Mutation("checkpoint-prune-keeps-one-more", "moetrain/checkpoint/manager.py",
             "steps[: max(0, len(steps) - self.keep_last)]",
             "steps[: max(0, len(steps) - self.keep_last - 1)]",
             ("tests/checkpoint/test_manager.py",), "keep_last keeps one checkpoint too many",
             keys=('checkpoint.keep_last',)),
    # -- behaviours no test pinned (issue 29), each with its own test
    Mutation("top-p-sigmoid-mass-over-chosen", "moetrain/model/moe/router.py",
             "probs_TK = probs_TK / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)",
             "probs_TK = probs_TK / topk_score_TK.sum(-1, keepdim=True).clamp_min(1e-20)",
             ("tests/model/test_routing_variants.py::test_top_p_with_sigmoid_scores_measures_the_mass_over_all_experts",),
             "top-p with sigmoid scores measures the mass over the chosen experts, not all",
             keys=('model.moe.routing.top_p', 'model.moe.score_func')),
    Mutation("yarn-attention-factor-dropped", "moetrain/model/rope.py",
             "    return yarn_mscale(scaling.factor)\n", "    return 1.0\n",
             ("tests/model/test_family_pieces.py::test_yarn_without_mscale_scales_attention_as_transformers",),
             "YaRN without mscale / mscale_all_dim: no 0.1 ln(factor) + 1 attention factor",
             keys=('model.rope_scaling.kind', 'model.rope_scaling.factor')),
    Mutation("export-olmoe-norm-topk-prob-dropped", "moetrain/hf/config.py",
             "num_experts=moe.num_experts,\n                                        norm_topk_prob=moe.norm_topk_prob)",
             "num_experts=moe.num_experts)",
             ("tests/hf/test_families.py::test_an_olmoe_model_that_renormalises_exports_a_config_that_says_so",),
             "OLMoE export leaves norm_topk_prob at transformers' default (false)",
             keys=('model.moe.norm_topk_prob', 'model.family')),
    Mutation("checkpoint-prune-by-name", "moetrain/checkpoint/manager.py",
             "            key=lambda p: int(p.name[len(_STEP_PREFIX):]),\n        )\n        for old",
             "            key=lambda p: p.name,\n        )\n        for old",
             ("tests/checkpoint/test_manager.py",),
             "keep_last orders step folders by name (step_10 before step_9)",
             keys=('checkpoint.keep_last',)),
    Mutation("bias-from-own-loads", "moetrain/trainer.py",
             'self.moe.finish_step(None if stats is None else columns.view(summed.device["moe"]))',
             "self.moe.finish_step(stats)",
             ("tests/distributed/test_equivalence_ep.py::test_four_rank_expert_parallel_layout_equals_one_process[tp2-ep2-gate-bias]",),
             "the expert bias moved by this rank's loads, not the step's global loads",
             keys=('model.moe.routing.bias_rate',)),
    Mutation("lbl-seq-counts-summed-over-dp", "moetrain/model/moe/losses.py",
             'return STEP if scope == "global" else MICRO_BATCH',
             'return STEP if scope in ("global", "seq") else MICRO_BATCH',
             ("tests/distributed/test_lbl_scope.py::test_scope_is_layout_invariant_where_the_micro_steps_are[dp2-seq]",),
             "seq-scope LBL counts summed over the data-parallel ranks too",
             keys=('model.moe.lbl.scope',)),
    Mutation("shared-gate-outside-router-unit", "moetrain/parallel/data_parallel.py",
             '            if not same("dp_cp_tp", "dp_cp"):\n                wrap(block.moe, "dp_cp_tp", reshard)',
             '            if not same("dp_cp_tp", "dp_cp"):\n'
             '                if block.moe.shared_expert_gate is not None:\n'
             '                    wrap(block.moe.shared_expert_gate, "dp_cp", reshard)\n'
             '                wrap(block.moe, "dp_cp_tp", reshard)',
             ("tests/distributed/test_equivalence_ep.py::test_four_rank_expert_parallel_layout_equals_one_process[tp2-ep2-gate-bias]",),
             "the shared-expert gate reduced over dp x cp, not with the router over dp x cp x tp",
             keys=('model.moe.shared_expert_gate',)),
    Mutation("pp-replicated-dp-not-reduced", "moetrain/parallel/parallelize.py",
             # (text common to this branch and integ's zero-bubble rework of the same lines)
             "    return apply_data_parallel(module, meshes, shard=",
             "    if rank.dims.pp > 1 and not parallel.fsdp.enabled:\n"
             "        return []\n    return apply_data_parallel(module, meshes, shard=",
             ("tests/distributed/test_equivalence_cp_pp.py::test_four_rank_layout_equals_one_process[pp2-dp2-replicated]",),
             "a pipeline step with replicated DP skips the gradient all-reduce",
             keys=('parallel.fsdp.enabled',)),
    # -- nothing silent (issue 22): the wrong data, tokenizer, model or directory
    Mutation("source-reused-by-name", "moetrain/data/prepare.py",
             "        _check_same_source(s, entry, raw, target, fix)\n", "        pass\n",
             ("tests/data/test_prepare.py::test_a_source_is_reused_only_for_the_path_and_field_it_was_prepared_from",),
             "a cached source of the same name trained on instead of the configured path",
             keys=('data.sources',)),
    Mutation("resume-architecture-not-compared", "moetrain/checkpoint/identity.py",
             "for k in sorted(saved.keys() & mine.keys()) if saved[k] != mine[k]]",
             "for k in sorted(saved.keys() & mine.keys()) if False]",
             ("tests/checkpoint/test_identity.py::test_another_family_with_equal_shapes_is_refused_naming_every_key",),
             "a checkpoint of another architecture with equal shapes resumed"),
    Mutation("hf-other-tokenizer-accepted", "moetrain/hf/tokenizer.py",
             "if source is None or cfg.model.init.allow_other_tokenizer:", "if True:",
             ("tests/hf/test_export_trained_model.py::test_another_tokenizer_than_the_hugging_face_models_is_refused_unless_allowed",),
             "continued pretraining on another tokenizer's ids",
             keys=('model.init.allow_other_tokenizer', 'model.init.from_hf')),
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
             "routing = self.moe.routing or self.moe.routing_at(step)",
             "routing = self.moe.routing_at(self.state.step)",
             ("tests/hf/test_export_trained_model.py::test_the_export_has_the_runs_eos_and_trained_top_k_and_its_loss",),
             "the export's top-k is the schedule's after the step the weights were trained at",
             keys=('model.moe.schedule.top_k.kind',)),
    Mutation("export-eos-from-the-files-only", "moetrain/hf/export.py",
             "special = {} if given_tokenizer else", "special = {} if True else",
             ("tests/hf/test_export_trained_model.py::test_the_export_has_the_runs_eos_and_trained_top_k_and_its_loss",),
             "a bare tokenizer.json exported without EOS"),
    Mutation("metrics-bare-nan", "moetrain/metrics/sinks.py",
             'self._file.write(strict_json(record) + "\\n")', 'self._file.write(json.dumps(record) + "\\n")',
             ("tests/test_trainer.py::test_a_nan_step_is_skipped_counted_and_training_goes_on",),
             "metrics.jsonl writes NaN (not JSON)"),
    Mutation("failing-step-record-lost", "moetrain/trainer.py",
             "                except TrainingError as err:\n                    roll_back, failing = False, err\n",
             "                except TrainingError:\n                    raise\n",
             ("tests/test_trainer.py::test_too_many_bad_steps_in_a_row_abort_with_a_clear_message",),
             "the record of the step that stops the run is lost"),
    Mutation("val-loss-ignores-mixture-weights", "moetrain/evaluation.py",
             "sum(w * per_source[n][key] for n, w in", "sum(per_source[n][key] for n, w in",
             ("tests/test_trainer.py::test_a_mixture_logs_each_sources_validation_loss_and_the_mfu",),
             "val_loss not the mixture-weighted mean of the sources' losses",
             keys=('data.sources',)),
    # -- multi-token prediction and packed documents (issue 25)
    Mutation("mtp-input-off-by-one", "moetrain/model/inputs.py",
             "mtp_tokens.append(window_p[:, k:k + S])",
             "mtp_tokens.append(window_p[:, k - 1:k - 1 + S])", (DOCUMENTS, MTP_ORACLE),
             "MTP depth k embeds t_{i+k-1} instead of t_{i+k}",
             keys=('model.mtp.depth',)),
    Mutation("mtp-targets-cross-documents", "moetrain/model/inputs.py",
             "valid = (doc_p[:, k:k + S] == doc[:, :S]) & (index + k + 1 <= S)",
             "valid = (index + k + 1 <= S)", (DOCUMENTS, MTP_ORACLE),
             "MTP targets across a document boundary scored",
             keys=('model.mtp.depth', 'data.document_mask')),
    Mutation("mtp-unmasked-targets-cross-documents", "moetrain/model/inputs.py",
             "valid = (doc_p[:, k:k + S] == doc[:, :S]) & (index + k + 1 <= S)",
             "valid = ((doc_p[:, k:k + S] == doc[:, :S]) | (not spec.document_mask))"
             " & (index + k + 1 <= S)", (MTP_ORACLE,),
             "without data.document_mask, MTP targets whose chain crosses an EOS scored",
             keys=('model.mtp.depth',)),
    Mutation("recompute-full-drops-document-positions", "moetrain/model/block.py",
             "checkpoint(self._forward, x_BSD, positions, doc_positions, use_reentrant=False)",
             "checkpoint(self._forward, x_BSD, positions, None, use_reentrant=False)",
             (MTP_ORACLE,),
             "a block recomputed in full (train.recompute=full) attends across documents",
             keys=('train.recompute', 'data.document_mask')),
    Mutation("mtp-loss-not-over-depth", "moetrain/parallel/loss.py",
             "self.mtp_weight = mtp_loss_scale / self.mtp_depth if",
             "self.mtp_weight = mtp_loss_scale if", (MTP_ORACLE,),
             "MTP loss lambda, not lambda / D",
             keys=('model.mtp.depth', 'model.mtp.loss_scale')),
    Mutation("mtp-concat-order", "moetrain/model/mtp.py",
             "torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1)",
             "torch.cat([self.hnorm(h_BSD), self.enorm(emb_BSD)], dim=-1)", (MTP_ORACLE,),
             "the MTP projection reads the hidden state first (not the released checkpoint's order)",
             keys=('model.mtp.depth',)),
    Mutation("documents-rope-window-positions", "moetrain/model/attention.py",
             "rope_positions = positions if doc_positions is None else doc_positions",
             "rope_positions = positions", (DOCUMENTS,),
             "RoPE positions do not restart at each document",
             keys=('data.document_mask',)),
    Mutation("documents-mask-ignored", "moetrain/model/documents.py",
             "mask = (k <= q) & (k >= start)", "mask = (k <= q) & (k >= start.clamp(max=0))",
             (DOCUMENTS, MTP_ORACLE), "attention crosses document boundaries",
             keys=('data.document_mask',)),
    Mutation("cp-mtp-inputs-from-the-chunk", "moetrain/model/inputs.py",
             "None if self.mtp_tokens is None else fn(self.mtp_tokens))",
             "None if self.mtp_tokens is None else torch.stack([fn(self.tokens).roll(-k, 1) "
             "for k in range(1, self.mtp_tokens.shape[-1] + 1)], -1))",
             ("tests/distributed/test_equivalence_mtp.py::"
              "test_two_rank_layout_with_mtp_and_documents_equals_one_process",),
             "under CP each chunk's MTP inputs come from the chunk, not the whole sequence"),
    Mutation("plan-no-last-stage-embedding-copy", "moetrain/plan_shards.py",
             "if first or (last and last_stage_embeds(model)):", "if first:",
             ("tests/test_dryrun.py",), "the planner misses the last stage's embedding copy"),
    Mutation("mtp-loss-scale-schedule-ignored", "moetrain/model/mtp.py",
             "return float(schedule_value(mtp.loss_scale_schedule, step, mtp.loss_scale))",
             "return float(mtp.loss_scale)", (MTP_ORACLE,), "the MTP loss weight's schedule ignored",
             keys=("model.mtp.loss_scale_schedule.kind", "model.mtp.loss_scale_schedule.milestones")),
    Mutation("boundary-loss-mask-ignored", "moetrain/trainer.py",
             'mask_boundary=cfg.data.boundary_loss == "mask"', "mask_boundary=False",
             (MTP_ORACLE,), "data.boundary_loss=mask scores the targets across document ends",
             keys=("data.boundary_loss",)),
    Mutation("mtp-block-always-moe", "moetrain/model/mtp.py",
             'moe_index = main_moe_layers(cfg) + depth_index if cfg.mtp.block == "moe" else None',
             "moe_index = main_moe_layers(cfg) + depth_index",
             (MTP_ORACLE,), "model.mtp.block=dense built as a MoE block", keys=("model.mtp.block",)),
    # -- FP8 (issue 26)
    Mutation("fp8-recipe-always-tensorwise", "moetrain/fp8/linear.py",
             "config = Float8LinearConfig.from_recipe_name(plan.recipe)",
             'config = Float8LinearConfig.from_recipe_name("tensorwise")',
             ("tests/fp8/test_recipes.py",), "every float8 linear scaled tensorwise whatever train.fp8",
             keys=("train.fp8",)),
    Mutation("fp8-output-head-ignored", "moetrain/fp8/linear.py",
             'if name == "output" and not plan.output_head:', 'if name == "output":',
             ("tests/fp8/test_recipes.py",), "the output head never in FP8",
             keys=("train.fp8_output_head",)),
    # -- the key-coverage sweep (issue 29): a bend of each math-changing config key
    Mutation("routed-scaling-ignored", "moetrain/model/moe/router.py",
             "if self.routed_scaling_factor != 1.0:", "if False:", ("tests/model/test_family_pieces.py",),
             "routed_scaling_factor not applied to the combine weights",
             keys=("model.moe.routed_scaling_factor",)),
    Mutation("score-func-always-softmax", "moetrain/model/moe/router.py",
             'if self.score_func == "softmax":\n            scores_TE = torch.softmax',
             'if True:\n            scores_TE = torch.softmax', ("tests/model/test_routing_variants.py", ORACLE),
             "sigmoid routing scores computed as a softmax", keys=("model.moe.score_func",)),
    Mutation("min-k-ignored", "moetrain/model/moe/router.py",
             "| (position_K < r.min_k)", "| (position_K < 1)", ("tests/model/test_routing_variants.py",),
             "top-p's min_k taken as 1", keys=("model.moe.routing.min_k",)),
    Mutation("group-score-max-ignored", "moetrain/model/moe/router.py",
             'best = 1 if r.group_score == "max" else min(2, E // G)', "best = min(2, E // G)",
             ("tests/model/test_family_pieces.py",), "group_score=max scored as the two best experts' sum",
             keys=("model.moe.routing.group_score",)),
    Mutation("topk-groups-one-more", "moetrain/model/moe/router.py",
             "torch.topk(group_score_TG, r.topk_groups, dim=-1)",
             "torch.topk(group_score_TG, min(r.topk_groups + 1, G), dim=-1)", ("tests/model/test_family_pieces.py", "tests/model/test_routing_variants.py"),
             "limited routing keeps one group more than topk_groups",
             keys=("model.moe.routing.topk_groups",)),
    Mutation("balanced-groups-ignored", "moetrain/model/moe/router.py",
             'if r.group_mode == "balanced":', "if False:", ("tests/model/test_routing_variants.py",),
             "group_mode=balanced routed as limited", keys=("model.moe.routing.group_mode",)),
    Mutation("groups-ignored", "moetrain/model/moe/router.py",
             'if r.group_mode == "none" or r.num_groups == 1:', "if True:", ("tests/model/test_routing_variants.py", "tests/model/test_family_pieces.py"),
             "expert groups ignored", keys=("model.moe.routing.group_mode",
                                            "model.moe.routing.num_groups")),
    Mutation("null-experts-compute", "moetrain/model/moe/router.py",
             "if self.num_experts > self.num_real_experts:  # null experts compute nothing",
             "if False:", ("tests/model/test_routing_variants.py",), "null experts treated as computing slots",
             keys=("model.moe.routing.num_null_experts",)),
    Mutation("lbl-coeff-doubled", "moetrain/model/moe/layer.py",
             "self.lbl_coeff = cfg.lbl.coeff", "self.lbl_coeff = 2 * cfg.lbl.coeff", (ORACLE,),
             "the LBL weighted twice its coefficient", keys=("model.moe.lbl.coeff",)),
    Mutation("z-coeff-doubled", "moetrain/model/moe/layer.py",
             "self.z_loss_coeff = cfg.z_loss_coeff", "self.z_loss_coeff = 2 * cfg.z_loss_coeff",
             (ORACLE,), "the z-loss weighted twice its coefficient",
             keys=("model.moe.z_loss_coeff",)),
    Mutation("shared-expert-hidden-ignored", "moetrain/model/moe/layer.py",
             "width = cfg.shared_expert_hidden or cfg.expert_hidden", "width = cfg.expert_hidden",
             ("tests/model/test_family_pieces.py",), "shared experts as wide as routed ones whatever shared_expert_hidden",
             keys=("model.moe.shared_expert_hidden", "model.moe.num_shared_experts")),
    Mutation("token-rounding-ignored", "moetrain/model/moe/layer.py",
             "if self.token_rounding is not None:", "if False:",
             ("tests/model/test_token_rounding.py", ORACLE), "token rounding not applied",
             keys=("model.moe.token_rounding",)),
    Mutation("schedule-cosine-as-linear", "moetrain/model/moe/schedule.py",
             'if kind == "cosine":\n        r =', 'if False:\n        r =', ("tests/model/test_schedule.py",),
             "cosine schedules ramp linearly", keys=("model.moe.schedule.top_k.kind",
                                                     "model.moe.schedule.capacity_factor.kind")),
    Mutation("schedule-milestone-one-late", "moetrain/model/moe/schedule.py",
             "if step >= m_step:", "if step > m_step:", ("tests/model/test_schedule.py",),
             "a step schedule's milestone acts one step late",
             keys=("model.moe.schedule.top_k.milestones",
                   "model.moe.schedule.capacity_factor.milestones")),
    Mutation("schedule-start-step-ignored", "moetrain/model/moe/schedule.py",
             "r = (step - sched.start_step) / (sched.end_step - sched.start_step)",
             "r = step / sched.end_step", ("tests/model/test_schedule.py",), "linear / cosine ramps start at step 0",
             keys=("model.moe.schedule.top_k.start_step",
                   "model.moe.schedule.capacity_factor.start_step",
                   "model.mtp.loss_scale_schedule.start_step")),
    # (not `>` for `>=`: at end_step the ramp itself gives `end`, an equivalent mutant)
    Mutation("schedule-end-step-one-early", "moetrain/model/moe/schedule.py",
             "if step >= sched.end_step:\n        return end",
             "if step >= sched.end_step - 1:\n        return end",
             ("tests/model/test_schedule.py",), "a ramp reaches its end one step early",
             keys=("model.moe.schedule.top_k.end_step",
                   "model.moe.schedule.capacity_factor.end_step",
                   "model.mtp.loss_scale_schedule.end_step")),
    Mutation("schedule-start-value-ignored", "moetrain/model/moe/schedule.py",
             "start = default if sched.start is None else sched.start", "start = default", ("tests/model/test_schedule.py",),
             "a schedule's start value replaced by the static config",
             keys=("model.moe.schedule.top_k.start", "model.moe.schedule.capacity_factor.start",
                   "model.mtp.loss_scale_schedule.start")),
    Mutation("schedule-end-value-ignored", "moetrain/model/moe/schedule.py",
             "end = default if sched.end is None else sched.end", "end = default", ("tests/model/test_schedule.py",),
             "a schedule's end value replaced by the static config",
             keys=("model.moe.schedule.top_k.end", "model.moe.schedule.capacity_factor.end",
                   "model.mtp.loss_scale_schedule.end")),
    Mutation("top-k-round-half-even", "moetrain/model/moe/schedule.py",
             "math.floor(value + 0.5)", "round(value)", ("tests/model/test_schedule.py",),
             "a top_k schedule rounds halves to even", keys=("model.moe.schedule.top_k.kind",)),
    Mutation("qk-norm-head-skipped", "moetrain/model/attention.py",
             'if self.qk_norm == "head":\n            q_BSHd, k_BSKd = self.q_norm',
             'if False:\n            q_BSHd, k_BSKd = self.q_norm', ("tests/model/test_family_pieces.py",),
             "per-head q/k norm not applied", keys=("model.qk_norm",)),
    Mutation("qk-norm-full-skipped", "moetrain/model/attention.py",
             'if self.qk_norm == "full":\n            q, k =', 'if False:\n            q, k =', ("tests/model/test_family_pieces.py",),
             "whole-projection q/k norm not applied", keys=("model.qk_norm",)),
    Mutation("rope-theta-default", "moetrain/model/attention.py",
             "rope_cos_sin(rope_positions, d, self.rope_theta, self.rope_scaling)",
             "rope_cos_sin(rope_positions, d, 10000.0, self.rope_scaling)",
             ("tests/hf/test_families.py",), "rope_theta ignored by GQA attention",
             keys=("model.rope_theta",)),
    Mutation("yarn-beta-fast-as-slow", "moetrain/model/rope.py",
             "low = max(math.floor(correction_dim(scaling.beta_fast)), 0)",
             "low = max(math.floor(correction_dim(scaling.beta_slow)), 0)", ("tests/model/test_family_pieces.py",),
             "YaRN's ramp starts at beta_slow", keys=("model.rope_scaling.beta_fast",
                                                      "model.rope_scaling.beta_slow")),
    Mutation("yarn-original-context-ignored", "moetrain/model/rope.py",
             "return (head_dim * math.log(scaling.original_max_position_embeddings",
             "return (head_dim * math.log(4096", ("tests/model/test_family_pieces.py",),
             "YaRN's ramp computed for a 4096-token original context",
             keys=("model.rope_scaling.original_max_position_embeddings",)),
    Mutation("yarn-mscale-ratio-dropped", "moetrain/model/rope.py",
             "if scaling.mscale and scaling.mscale_all_dim:", "if False:", ("tests/model/test_family_pieces.py",),
             "YaRN's mscale / mscale_all_dim ratio replaced by the plain factor",
             keys=("model.rope_scaling.mscale", "model.rope_scaling.mscale_all_dim")),
    Mutation("mla-softmax-mscale-dropped", "moetrain/model/mla.py",
             "scale *= yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim) ** 2",
             "scale *= 1.0", ("tests/model/test_family_pieces.py",), "MLA's softmax scale without YaRN's mscale_all_dim",
             keys=("model.rope_scaling.mscale_all_dim",)),
    Mutation("optim-min-lr-zero", "moetrain/optim/__init__.py",
             "min_lr = cfg.lr * cfg.min_lr_ratio", "min_lr = 0.0", ("tests/test_optim.py",),
             "decay goes to 0, not lr * min_lr_ratio", keys=("optim.min_lr_ratio",)),
    Mutation("optim-linear-as-cosine", "moetrain/optim/__init__.py",
             'if cfg.decay == "linear":', "if False:", ("tests/test_optim.py",),
             "linear decay follows the cosine", keys=("optim.decay",)),
    Mutation("optim-betas-swapped", "moetrain/optim/__init__.py",
             "lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)", "lr=cfg.lr, betas=(cfg.beta2, cfg.beta1)",
             ("tests/test_optim.py", ORACLE), "AdamW's beta1 and beta2 swapped",
             keys=("optim.beta1", "optim.beta2")),
    Mutation("eval-capacity-ignored", "moetrain/model/moe/control.py",
             "layer.configure(top_k=routing.top_k, capacity_factor=self.eval_capacity_factor)",
             "layer.configure(top_k=routing.top_k, capacity_factor=routing.capacity_factor)",
             ("tests/model/test_routing_variants.py", "tests/test_moe_writers.py"), "evaluation at the training capacity",
             keys=("train.eval_capacity_factor",)),
    # model shape keys: a bend that still builds (or fails to load a transformers model)
    Mutation("init-std-fixed", "moetrain/model/init.py",
             "    std = cfg.init_std\n", "    std = 0.02\n", ("tests/model/test_init.py",),
             "weights drawn with std 0.02 whatever model.init_std", keys=("model.init_std",)),
    Mutation("init-residual-std-ignores-depth", "moetrain/model/init.py",
             "residual_std = std / math.sqrt(2 * cfg.n_layers)", "residual_std = std / math.sqrt(2)",
             ("tests/model/test_init.py",), "residual projections not scaled by 1/sqrt(2 n_layers)",
             keys=("model.n_layers",)),
    Mutation("tie-embeddings-ignored", "moetrain/model/transformer.py",
             "        if cfg.tie_embeddings:\n", "        if False:\n",
             ("tests/oracle/test_oracle.py::test_trainer_equals_the_independent_reference[shared-tied-noclip]",),
             "output projection untied from the embeddings", keys=("model.tie_embeddings",)),
    Mutation("head-dim-from-d-model", "moetrain/model/block.py",
             "cfg.n_kv_heads, head_dim_of(cfg), cfg.rope_theta",
             "cfg.n_kv_heads, cfg.d_model // cfg.n_heads, cfg.rope_theta",
             ("tests/hf/test_families.py",), "model.head_dim ignored (d_model / n_heads)",
             keys=("model.head_dim", "model.d_model")),
    Mutation("kv-heads-as-heads", "moetrain/model/block.py",
             "Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads,",
             "Attention(cfg.d_model, cfg.n_heads, cfg.n_heads,",
             ("tests/hf/test_families.py",), "GQA built with as many key/value heads as query heads",
             keys=("model.n_kv_heads", "model.n_heads")),
    Mutation("mla-built-as-gqa", "moetrain/model/block.py",
             '    if cfg.attention == "mla":\n', "    if False:\n", ("tests/hf/test_families.py",),
             "model.attention=mla built as GQA", keys=("model.attention",)),
    Mutation("final-norm-eps-fixed", "moetrain/model/transformer.py",
             "self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, cfg.norm_eps)",
             "self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, 1e-5)",
             ("tests/hf/test_families.py",), "the final norm's eps hard-coded to 1e-5",
             keys=("model.norm_eps",)),
    Mutation("ffn-hidden-as-expert-hidden", "moetrain/model/block.py",
             "FeedForward(cfg.d_model, cfg.ffn_hidden)", "FeedForward(cfg.d_model, cfg.moe.expert_hidden)",
             ("tests/hf/test_families.py",), "dense layers as wide as an expert",
             keys=("model.ffn_hidden", "model.moe.expert_hidden")),
    Mutation("mla-q-lora-ignored", "moetrain/model/mla.py",
             "        if mla.q_lora_rank is None:\n", "        if True:\n",
             ("tests/model/test_family_pieces.py",), "MLA's query low-rank path never built",
             keys=("model.mla.q_lora_rank",)),
    Mutation("mla-nope-and-v-swapped", "moetrain/model/mla.py",
             "= mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim",
             "= mla.v_head_dim, mla.qk_rope_head_dim, mla.qk_nope_head_dim",
             ("tests/model/test_family_pieces.py",), "MLA's no-position and value head widths swapped",
             keys=("model.mla.qk_nope_head_dim", "model.mla.v_head_dim")),
    Mutation("mla-scale-without-rope-dims", "moetrain/model/mla.py",
             "scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5",
             "scale = mla.qk_nope_head_dim ** -0.5", ("tests/model/test_family_pieces.py",),
             "MLA's softmax scale leaves out the rotary dimensions",
             keys=("model.mla.qk_rope_head_dim",)),
    # MoE, data, optimizer, training, checkpointing keys
    Mutation("pad-to-capacity-ignored", "moetrain/model/moe/dispatcher.py",
             "if self.pad_to_capacity and routing.capacity is not None:", "if False:",
             ("tests/model/test_dispatcher.py",), "expert buffers not padded to the capacity",
             keys=("model.moe.pad_to_capacity",)),
    Mutation("on-exhausted-always-repeats", "moetrain/data/sampler.py",
             'self.on_exhausted = str(getattr(on_exhausted, "value", on_exhausted))',
             'self.on_exhausted = "repeat"', ("tests/data/test_sampler.py",),
             "an exhausted source repeats under on_exhausted=stop", keys=("data.on_exhausted",)),
    Mutation("val-split-never-empty", "moetrain/data/tokenize.py",
             "n_val = 0 if val_fraction <= 0 else max(1, round(n_blocks * val_fraction))",
             "n_val = max(1, round(n_blocks * val_fraction))",
             ("tests/data/test_prepare.py", "tests/test_trainer.py::test_a_validation_split_too_small_to_evaluate_is_refused_before_training"),
             "data.val_fraction=0 still holds out a block", keys=("data.val_fraction",)),
    Mutation("lr-span-ignores-warmup", "moetrain/optim/__init__.py",
             "span = max(1, max_steps - cfg.warmup_steps)", "span = max(1, max_steps)",
             ("tests/test_optim.py",), "decay measured over max_steps, not max_steps - warmup",
             keys=("train.max_steps",)),
    Mutation("max-bad-steps-one-more", "moetrain/recovery.py",
             "if state.bad_in_row < max_bad_steps:", "if state.bad_in_row <= max_bad_steps:",
             ("tests/test_trainer.py::test_too_many_bad_steps_in_a_row_abort_with_a_clear_message",),
             "a streak of max_bad_steps bad steps goes on", keys=("train.max_bad_steps",)),
    Mutation("rollback-never", "moetrain/recovery.py",
             '    if on_bad_steps == "rollback":\n', "    if False:\n",
             ("tests/faults/test_checkpoint_faults.py::test_rollback_reloads_the_last_good_checkpoint_and_skips_the_streaks_batches",),
             "on_bad_steps=rollback stops instead", keys=("train.on_bad_steps",)),
    Mutation("checkpoint-only-at-the-end", "moetrain/trainer.py",
             "due = c.every > 0 and (self.state.step % c.every == 0 or finished)",
             "due = c.every > 0 and finished",
             ("tests/faults/test_checkpoint_faults.py::test_rollback_reloads_the_last_good_checkpoint_and_skips_the_streaks_batches",),
             "checkpoint.every ignored: one checkpoint at the end", keys=("checkpoint.every",)),
    Mutation("optim-eps-fixed", "moetrain/optim/__init__.py",
             "betas=(cfg.beta1, cfg.beta2),\n                             eps=cfg.eps,",
             "betas=(cfg.beta1, cfg.beta2),\n                             eps=1e-8,",
             ("tests/test_optim.py",), "AdamW's eps fixed at 1e-8 whatever optim.eps",
             keys=("optim.eps",)),
    Mutation("seed-ignored-by-init", "moetrain/trainer.py",
             "init_parameters(self.model, cfg.model, t.seed)", "init_parameters(self.model, cfg.model, 0)",
             ("tests/test_trainer.py::test_train_seed_sets_the_initial_weights",),
             "initial weights the same whatever train.seed", keys=("train.seed",)),
    Mutation("eval-batches-one-more", "moetrain/evaluation.py",
             "val_steps(n, t.eval_batches, G,", "val_steps(n, t.eval_batches + 1, G,",
             ("tests/test_trainer.py::test_a_mixture_logs_each_sources_validation_loss_and_the_mfu",),
             "evaluation over one global batch more than train.eval_batches",
             keys=("train.eval_batches",)),
    # -- the keys left uncovered after issue 29's first sweep
    Mutation("upcycle-w2-not-scaled", "moetrain/model/upcycle.py",
             'expert = dense_w[:, rows].t() * m if w == "w2" else dense_w[rows].t()',
             'expert = dense_w[:, rows].t() if w == "w2" else dense_w[rows].t()',
             ("tests/model/test_upcycle.py",),
             "fine-grained upcycling leaves the experts' w2 unscaled (m slices of the MLP summed "
             "by top-m routing give 1/m of it)", keys=("model.init.upcycle_granularity",)),
    Mutation("upcycle-only-when-resuming", "moetrain/trainer.py",
             "if init.upcycle_from and fresh:", "if init.upcycle_from and not fresh:",
             ("tests/test_trainer.py::test_upcycling_starts_the_moe_run_from_a_dense_run",),
             "a fresh run ignores model.init.upcycle_from (starts from random weights)",
             keys=("model.init.upcycle_from",)),
    Mutation("lbl-without-num-experts", "moetrain/model/moe/losses.py",
             "return E * _FrozenWeightSum.apply(p_E, f_E), counts_E",
             "return _FrozenWeightSum.apply(p_E, f_E), counts_E",
             ("tests/model/test_losses.py", ORACLE),
             "LBL without its factor E (Switch: E sum f_i P_i, 1 at perfect balance whatever E)",
             keys=("model.moe.num_experts",)),
    Mutation("prepared-tokenizer-not-compared", "moetrain/data/prepare.py",
             'if tok.get("sha256") != spec.sha256:', "if False:",
             ("tests/data/test_prepare.py",),
             "a prepared directory tokenised by another tokenizer than data.tokenizer.path trained on",
             keys=("data.tokenizer.path",)),
    Mutation("prepared-bpe-size-not-compared", "moetrain/data/prepare.py",
             'if tok.get("source") is not None or tok["vocab_size"] != spec.vocab_size:',
             'if tok.get("source") is not None:', ("tests/data/test_prepare.py",),
             "a prepared directory with a BPE of another size than data.tokenizer.vocab_size "
             "trained on", keys=("data.tokenizer.vocab_size",)),
    Mutation("model-vocab-vs-largest-id", "moetrain/data/prepare.py",
             "if tok.vocab_size > model_vocab_size:", "if tok.vocab_size - 1 > model_vocab_size:",
             ("tests/data/test_prepare.py",),
             "the tokenizer's largest id, not its size, compared with model.vocab_size: a "
             "tokenizer one token larger than the embedding accepted", keys=("model.vocab_size",)),
    Mutation("eos-token-ignored", "moetrain/data/tokenizer.py",
             "            eos = self._sp.piece_to_id(eos_token)\n",
             "            eos = self._sp.eos_id()\n", ("tests/data/test_tokenizer.py",),
             "data.tokenizer.eos_token ignored: documents end with the file's own EOS piece",
             keys=("data.tokenizer.eos_token",)),
    Mutation("dtype-bf16-ignored", "moetrain/runtime.py",
             'autocast_dtype = torch.bfloat16 if dtype == "bf16" else None', "autocast_dtype = None",
             ("tests/test_runtime.py",), "train.dtype=bf16 computes in fp32",
             keys=("train.dtype",)),
    Mutation("sample-windows-skip-a-token", "moetrain/data/dataset.py",
             "out[row] = self._window(self._check(i) * self.seq_len, self.seq_len + 1)",
             "out[row] = self._window(self._check(i) * (self.seq_len + 1), self.seq_len + 1)",
             ("tests/data/test_dataset.py",),
             "samples start seq_len + 1 tokens apart: the token between two windows is never a "
             "target", keys=("data.seq_len",)),
    Mutation("corpus-ignored", "moetrain/data/sources.py",
             "path = str(corpus) if corpus else str(SHIPPED_CORPUS)", "path = str(SHIPPED_CORPUS)",
             ("tests/data/test_sources.py",),
             "data.corpus ignored: the shipped corpus trained on instead", keys=("data.corpus",)),
    Mutation("fp8-backend-te-as-torchao", "moetrain/fp8/plan.py",
             "return FP8Plan(recipe, backend, emulate=False, output_head=train.fp8_output_head)",
             'return FP8Plan(recipe, "torchao", emulate=False, output_head=train.fp8_output_head)',
             ("tests/fp8/test_config.py",),
             "train.fp8_backend=te on a GPU silently runs torchao's float8 linears",
             keys=("train.fp8_backend",)),
    Mutation("planner-latent-kv-norm-dropped", "moetrain/planning.py",
             "kv = (d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank\n",
             "kv = (d * (m.kv_lora_rank + m.qk_rope_head_dim)\n", ("tests/test_plan.py",),
             "the planner leaves out MLA's latent norm (kv_lora_rank gains per layer)",
             keys=("model.mla.kv_lora_rank",)),
    Mutation("cp-qk-clip-max-logits-across-documents", "moetrain/parallel/context_parallel.py",
             "k_positions=key_positions,\n                                 doc_positions=doc_positions)",
             "k_positions=key_positions,\n                                 doc_positions=None)",
             ("tests/distributed/test_equivalence_mtp.py::"
              "test_two_rank_layout_with_mtp_and_documents_equals_one_process",),
             "under CP, QK-clip's largest logits taken over keys of other documents",
             keys=("optim.qk_clip_threshold", "data.document_mask")),
)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | survived | timeout | error (pytest could not run the tests)
    test: str  # the first failing test ("" when none)
    seconds: float


# -- the key-coverage sweep (issue 29) --------------------------------------------------------
# Every leaf key of moetrain/config/schema.py is either a MATH key (its value changes what is
# computed: routing, losses, schedules, attention, optimizer, data, checkpointing, export) - each
# must be bent by some mutation above (`keys=`) that its test catches - or listed in NOT_MATH
# (by prefix) with the reason. `--keys` prints the table; an uncovered math key is a failing line.
MATH_KEYS: tuple[str, ...] = (
    # model shape and attention
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.head_dim", "model.ffn_hidden", "model.rope_theta", "model.norm_eps",
    "model.tie_embeddings", "model.init_std", "model.family", "model.attention", "model.qk_norm",
    "model.mla.q_lora_rank", "model.mla.kv_lora_rank", "model.mla.qk_nope_head_dim",
    "model.mla.qk_rope_head_dim", "model.mla.v_head_dim",
    "model.rope_scaling.kind", "model.rope_scaling.factor",
    "model.rope_scaling.original_max_position_embeddings", "model.rope_scaling.beta_fast",
    "model.rope_scaling.beta_slow", "model.rope_scaling.mscale", "model.rope_scaling.mscale_all_dim",
    "model.init.upcycle_from", "model.init.upcycle_granularity", "model.init.from_hf",
    "model.init.allow_other_tokenizer",
    # MoE layer, routing, losses, schedules
    "model.moe.num_experts", "model.moe.top_k", "model.moe.expert_hidden",
    "model.moe.first_dense_layers", "model.moe.num_shared_experts", "model.moe.shared_expert_hidden",
    "model.moe.score_func", "model.moe.norm_topk_prob", "model.moe.routed_scaling_factor",
    "model.moe.shared_expert_gate", "model.moe.capacity_factor", "model.moe.pad_to_capacity",
    "model.moe.token_rounding", "model.moe.lbl.scope", "model.moe.lbl.coeff",
    "model.moe.z_loss_coeff",
    *(f"model.moe.schedule.{v}.{f}" for v in ("top_k", "capacity_factor")
      for f in ("kind", "start", "end", "start_step", "end_step", "milestones")),
    "model.moe.routing.top_p", "model.moe.routing.min_k", "model.moe.routing.bias_rate",
    "model.moe.routing.group_mode", "model.moe.routing.num_groups", "model.moe.routing.topk_groups",
    "model.moe.routing.group_score", "model.moe.routing.num_null_experts",
    # data
    "data.corpus", "data.sources", "data.tokenizer.path", "data.tokenizer.vocab_size",
    "data.tokenizer.eos_token", "data.seq_len", "data.val_fraction", "data.on_exhausted",
    # optimizer and training
    "optim.lr", "optim.min_lr_ratio", "optim.weight_decay", "optim.beta1", "optim.beta2",
    "optim.eps", "optim.warmup_steps", "optim.decay", "optim.grad_clip",
    "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.seed",
    "train.dtype", "train.eval_batches", "train.eval_capacity_factor", "train.recompute",
    "train.max_bad_steps", "train.on_bad_steps",
    # checkpointing and the parallel layout's one math-visible choice
    "checkpoint.every", "checkpoint.resume", "checkpoint.keep_last", "parallel.fsdp.enabled",
    # multi-token prediction and packed documents (issue 25)
    "model.mtp.depth", "model.mtp.loss_scale", "model.mtp.block",
    *(f"model.mtp.loss_scale_schedule.{f}"
      for f in ("kind", "start", "end", "start_step", "end_step", "milestones")),
    "data.document_mask", "data.boundary_loss",
    # FP8 (issue 26): the rounding of the GEMMs' operands
    "train.fp8", "train.fp8_backend", "train.fp8_output_head",
    # Muon and MuonClip's QK-clip (issue 24)
    "optim.name", "optim.momentum", "optim.nesterov", "optim.ns_steps", "optim.ns_dtype",
    "optim.qk_clip_threshold",
)
NOT_MATH: dict[str, str] = {
    "run.": "where the run's files go and its name",
    "parallel.": "the layout: must NOT change what is computed; tests/distributed proves each "
                 "layout equal to one process (docs/equivalence.md)",
    "model.moe.kernels": "an implementation choice; tests/kernels compares each with PyTorch",
    "model.moe.ep_budget": "the sync-free expert exchange's receive budget; tests/distributed "
                           "proves it (overflow redos included) bitwise equal to the exact exchange",
    "model.moe.ep_overlap": "the overlapped expert exchange; tests/distributed proves it bitwise "
                            "equal to the plain one",
    "model.max_position_embeddings": "a declaration carried to Hugging Face configs; RoPE does "
                                     "not read it (YaRN reads rope_scaling's original length)",
    "data.prepared_dir": "a cache folder (its identity is checked, issue 22)",
    "data.auto_prepare": "whether a missing cache is built or refused",
    "data.num_workers": "tokenising processes; the prepared tokens do not depend on it",
    "train.deterministic": "algorithm choice for bit-reproducibility",
    "train.device": "where it runs",
    "train.log_every": "logging cadence",
    "train.eval_every": "when to evaluate (not what)",
    "train.max_time": "wall-clock budget",
    "train.compile": "compilation; tests/distributed/test_compile.py proves it equal",
    "checkpoint.async_save": "background writing of the same state",
    "fault.": "timeouts and watchdogs",
    "logging.": "sinks for the same records",
}


def schema_keys() -> list[str]:
    """Every leaf key of the config schema (dotted)."""
    import dataclasses

    sys.path.insert(0, str(ROOT))
    from moetrain.config.schema import MoetrainConfig

    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else None)
            if default is not None and dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")

    walk(MoetrainConfig, "")
    return out


class UnclassifiedKey(Exception):
    """A config key that is neither a MATH key nor under a NOT_MATH prefix."""


def classify(key: str) -> str:
    """"math" or the NOT_MATH reason of a dotted schema key; UnclassifiedKey (one line naming
    the key) for a key in neither - a key added by a new feature must be classified here."""
    if key in MATH_KEYS:
        return "math"
    for prefix, why in NOT_MATH.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return why
    raise UnclassifiedKey(
        f"config key {key} is not classified for the key-coverage sweep: add it to MATH_KEYS "
        "with a mutation that bends it (keys=...) or to NOT_MATH with the reason, in "
        "scripts/mutation_check.py")


def unclassified_keys() -> list[str]:
    """Schema keys neither in MATH_KEYS nor under a NOT_MATH prefix (must be empty)."""
    out = []
    for key in schema_keys():
        try:
            classify(key)
        except UnclassifiedKey:
            out.append(key)
    return out


def check_classification(mutations: Sequence[Mutation] = MUTATIONS) -> None:
    """Every schema key classified, MATH_KEYS and the mutations' keys all in the schema."""
    keys = set(schema_keys())
    for key in schema_keys():
        classify(key)
    stale = [k for k in MATH_KEYS if k not in keys]
    if stale:
        raise UserError(f"MATH_KEYS names {', '.join(stale)}, not in the config schema: "
                        "remove or rename them in scripts/mutation_check.py")
    for m in mutations:
        bad = [k for k in m.keys if k not in MATH_KEYS]
        if bad:
            raise UserError(f"mutation {m.name}: keys {', '.join(bad)} are not MATH_KEYS")


def load_results(path: Path = RESULTS) -> dict[str, dict]:
    """The recorded outcomes, by mutation name ({} when none)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err}); restore it from git") from None


def record_results(outcomes: Sequence["Outcome"], meta: dict, path: Path = RESULTS) -> None:
    """Merge this run's outcomes into `path` (other mutations' records are kept)."""
    results = load_results(path)
    for o in outcomes:
        results[o.mutation.name] = {"status": o.status, "test": o.test,
                                    "seconds": round(o.seconds, 1), "digest": o.mutation.digest,
                                    **meta}
    path.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")


def _record_line(m: Mutation, results: dict[str, dict]) -> tuple[bool, str]:
    """(caught by a current record, the table cell)."""
    r = results.get(m.name)
    if r is None:
        return False, "**NOT RUN** (no recorded outcome)"
    if r["digest"] != m.digest:
        return False, f"**STALE** (mutation changed since its run of {r['date']}): re-run it"
    if r["status"] in ("caught", "timeout"):
        return True, f"`{r['test']}`" if r["status"] == "caught" else "timeout (counted caught)"
    return False, f"**{r['status'].upper()}** ({r['date']})"


def key_report(mutations: Sequence[Mutation] = MUTATIONS,
               results: Optional[dict[str, dict]] = None) -> tuple[str, list[str]]:
    """(the key -> mutation -> catching test table, the failing keys: those with no
    mutation, or none recorded caught by the current mutation text)."""
    results = load_results() if results is None else results
    rows = ["| math-changing key | mutation (bend) | caught by |", "|---|---|---|"]
    failing = []
    for key in MATH_KEYS:
        bending = [m for m in mutations if key in m.keys]
        if not bending:
            failing.append(key)
            rows.append(f"| `{key}` | **UNCOVERED: no mutation bends it** | **FAIL** |")
            continue
        cells = [(m, *_record_line(m, results)) for m in bending]
        if not any(ok for _, ok, _ in cells):
            failing.append(key)
        for m, ok, cell in cells:
            rows.append(f"| `{key}` | `{m.name}`: {m.what} | {cell} |")
    n = len(MATH_KEYS)
    rows += ["", f"{n - len(failing)} of {n} math-changing keys covered (bent by a mutation "
                 f"that a recorded run shows caught). Failing: {', '.join(failing) or 'none'}."]
    return "\n".join(rows), failing


def results_report(mutations: Sequence[Mutation] = MUTATIONS,
                   results: Optional[dict[str, dict]] = None) -> tuple[str, list[str]]:
    """(every mutation's recorded outcome as a table, the mutations not recorded caught)."""
    results = load_results() if results is None else results
    rows = ["| mutation | file | bug | keys | caught by | s | run |", "|---|---|---|---|---|---|---|"]
    failing = []
    for m in mutations:
        ok, cell = _record_line(m, results)
        r = results.get(m.name) or {}
        if not ok:
            failing.append(m.name)
        keys = ", ".join(f"`{k}`" for k in m.keys) or "-"
        rows.append(f"| `{m.name}` | `{m.path}` | {m.what} | {keys} | {cell} | "
                    f"{r.get('seconds', '')} | {r.get('date', '')} |")
    rows += ["", f"{len(mutations) - len(failing)} of {len(mutations)} mutations recorded caught. "
                 f"Not caught or not run: {', '.join(failing) or 'none'}."]
    return "\n".join(rows), failing


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


def write_report(doc: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    content = doc.read_text()
    if content.count(begin) != 1 or content.count(end) != 1:
        raise UserError(f"{doc}: needs one {begin} and one {end} line to replace between")
    head, rest = content.split(begin)
    _, tail = rest.split(end)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def marked_block(doc: Path, begin: str = KEYS_BEGIN, end: str = KEYS_END) -> str:
    """The text between the markers in `doc` (as write_report wrote it)."""
    content = doc.read_text()
    if content.count(begin) != 1 or content.count(end) != 1:
        raise UserError(f"{doc}: needs one {begin} and one {end} line")
    return content.split(begin)[1].split(end)[0].strip("\n")


def coverage_text(mutations: Sequence[Mutation] = MUTATIONS,
                  results: Optional[dict[str, dict]] = None) -> tuple[str, list[str]]:
    """The docs' generated block: the key table, then every mutation's record; and what fails."""
    results = load_results() if results is None else results
    keys, failing_keys = key_report(mutations, results)
    muts, failing_muts = results_report(mutations, results)
    text = (f"Generated by `python scripts/mutation_check.py --report docs/testing.md` from its "
            f"MUTATIONS and `docs/mutation_results.json`; do not edit by hand.\n\n"
            f"**Keys.**\n\n{keys}\n\n**Mutations.**\n\n{muts}")
    return text, failing_keys + [f"mutation {n}" for n in failing_muts]


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
    ap.add_argument("--write-run-table", dest="write", type=Path, metavar="DOC",
                    help=f"after running the chosen mutations (every one by default: about half "
                         f"an hour), replace the run's table between {BEGIN} and {END} in DOC "
                         f"(--report is the cheap refresh, from the record)")
    ap.add_argument("--record", action="store_true",
                    help=f"merge the outcomes into {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--machine", default=f"{platform.node()}, {os.cpu_count()} CPUs",
                    help="the machine, for the record")
    ap.add_argument("--keys", action="store_true",
                    help="print the key-coverage table (from the record) and exit")
    ap.add_argument("--report", type=Path, metavar="DOC",
                    help=f"replace the key-coverage block between {KEYS_BEGIN} and {KEYS_END}")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the tests once on the clean tree first")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        check_classification()
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            raise UserError(f"--only {sorted(unknown)}: no such mutation (see --list)")
        for doc in (args.write, args.report):
            if doc is not None and not doc.is_file():
                raise UserError(f"{doc}: no such file")
        if args.record and args.tests:
            raise UserError("--record keeps each mutation's outcome under its own tests; "
                            "drop --tests")
        if args.keys or args.report is not None:
            if args.report is not None:  # forget the records of mutations no longer listed
                results = load_results()
                listed = {k: v for k, v in results.items() if k in {m.name for m in MUTATIONS}}
                if listed != results:
                    RESULTS.write_text(json.dumps(listed, indent=1) + "\n")
            text, failing = coverage_text()
            if args.report is not None:
                write_report(args.report, text, KEYS_BEGIN, KEYS_END)
            print(text if args.keys else text.split("**Mutations.**")[0].rstrip())
            for item in failing:  # a key, or "mutation NAME"
                print(f"FAIL: {item}: no recorded run of the current text catches it"
                      if item.startswith("mutation ") else
                      f"FAIL: key {item}: no mutation bending it is recorded caught",
                      file=sys.stderr)
            return 1 if failing else 0
        chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
        if args.list:
            check_mutations(chosen, ROOT)
            for m in chosen:
                print(f"{m.name:40s} {m.path:36s} {m.what}")
            return 0
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()  # the run's
        start = time.monotonic()
        outcomes = run(chosen, ROOT, timeout=args.timeout, python=sys.executable,
                       tests=args.tests, baseline=not args.no_baseline)
    except UnclassifiedKey as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch  # only for the record of the version

    which = f"`--tests {' '.join(args.tests)}`" if args.tests else "each mutation's own tests"
    text = report(outcomes, f"Commit `{commit}`, torch {torch.__version__}, {which}, "
                            f"{time.monotonic() - start:.0f} s in all (2-core CPU machine).")
    print(text)
    if args.write is not None:
        write_report(args.write, text)
    if args.record:
        record_results(outcomes, {"date": datetime.date.today().isoformat(), "commit": commit,
                                  "machine": args.machine})
    return 0 if all(o.status in ("caught", "timeout") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
