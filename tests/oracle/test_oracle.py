"""The single-process trainer equals an independent reference step by step (docs/testing.md).

The layout equivalence tests compare every layout with the single-process `Trainer`; this file
compares that trainer with `tests/oracle/reference.py`, written from docs/ without the trainer,
the parallel context or the MoE layer's loss and statistics code, so what the trainer does at
every layout (aux-loss bookkeeping, accumulation scales, bias, schedules) is checked too.
"""

import pytest

from tests.documents import documents_overrides
from tests.oracle.lockstep import run_lockstep

BIAS = ("model.moe.routing.bias_rate=0.01",)
QK_CLIP = 0.055  # below the tiny model's largest attention logits of the first steps
# Each case: the micro-batching (global batch 4), the LBL scope and the routing features it covers.
CASES = {
    "micro-1mb": ("train.micro_batch_size=4",),
    "micro-2mb": (),
    "micro-nonorm": ("model.moe.norm_topk_prob=false",),
    "seq-2mb": ("model.moe.lbl.scope=seq",),
    "global-4mb": ("model.moe.lbl.scope=global", "train.micro_batch_size=1"),
    "bias-norm": BIAS,
    "bias-nonorm-sigmoid": (*BIAS, "model.moe.norm_topk_prob=false",
                            "model.moe.score_func=sigmoid"),
    "bias-capacity-global-4mb": (*BIAS, "model.moe.capacity_factor=0.8",
                                 "model.moe.lbl.scope=global", "train.micro_batch_size=1"),
    "capacity-pad-rounding": ("model.moe.capacity_factor=0.8", "model.moe.pad_to_capacity=true",
                              "model.moe.token_rounding=4"),
    # top_k 4, 3 (2.5 rounded up), 1; dropless at step 0, capacity factor 1 from step 1.
    "top-k-and-capacity-schedules": (
        "model.moe.schedule.top_k.kind=linear", "model.moe.schedule.top_k.start=4",
        "model.moe.schedule.top_k.end=1", "model.moe.schedule.top_k.end_step=2",
        "model.moe.schedule.capacity_factor.kind=step",
        "model.moe.schedule.capacity_factor.milestones=[[1,1.0]]"),
    "recompute-moe-global-2mb": ("train.recompute=moe", "model.moe.lbl.scope=global"),
    "recompute-full-seq-4mb": ("train.recompute=full", "model.moe.lbl.scope=seq",
                               "train.micro_batch_size=1"),
    # Near-uniform routing at init (~1/6 per slot): top_p 0.35 takes 2 or 3 experts.
    "top-p-null-experts": ("model.moe.routing.top_p=0.35", "model.moe.routing.num_null_experts=2",
                           "model.moe.top_k=3"),
    # Shared expert, tied embeddings, linear LR decay, no clipping.
    "shared-tied-noclip": ("model.moe.num_shared_experts=1", "model.tie_embeddings=true",
                           "optim.decay=linear", "optim.grad_clip=0"),
    # Muon (torch.optim.Muon on each whole matrix and each expert's slice; AdamW for the rest).
    "muon": ("optim=muon",),
    # ... with QK-clip below the heads' largest logits (~0.05-0.07 here), a shared expert and
    # tied embeddings (AdamW for the one embedding / output matrix).
    "muon-qk-clip-shared-tied": ("optim=muon", f"optim.qk_clip_threshold={QK_CLIP}",
                                 "model.moe.num_shared_experts=1", "model.tie_embeddings=true"),
    # ... plain momentum, 3 Newton-Schulz steps, and the max logits through a full recompute.
    "muon-plain-momentum-recompute": ("optim=muon", "optim.nesterov=false", "optim.momentum=0.9",
                                      "optim.ns_steps=3", f"optim.qk_clip_threshold={QK_CLIP}",
                                      "train.recompute=full"),
}
# Multi-token prediction on short documents (tests/documents.py: windows of 16 tokens hold
# document boundaries): two MoE modules (their experts biased and balanced like the main
# model's) with document-masked attention and per-document RoPE positions; one dense module with
# the EOS -> next-document target masked, lambda from a schedule (0.3, then 0.1 from step 2),
# a tied head and recomputation; recomputation under the mask; the documents unmasked.
DOCUMENT_CASES = {
    "mtp2-moe-documents-bias": ("model.mtp.depth=2", "data.document_mask=true", *BIAS),
    "mtp1-dense-boundary-mask-schedule": (
        "model.mtp.depth=1", "model.mtp.block=dense", "data.boundary_loss=mask",
        "model.mtp.loss_scale_schedule.kind=step",
        "model.mtp.loss_scale_schedule.milestones=[[2,0.1]]", "model.tie_embeddings=true",
        "train.recompute=full"),
    # MuonClip over packed documents with an MTP module: the largest logits within each
    # document, the MTP block's heads clipped and its matrices Muon's like the layers'
    "mtp1-muon-qk-clip-documents": ("model.mtp.depth=1", "data.document_mask=true",
                                    "optim=muon", f"optim.qk_clip_threshold={QK_CLIP}"),
    # Whole blocks recomputed in backward under the document mask: the checkpointed block gets
    # the document positions (main blocks and the MTP modules' MoE blocks)
    "mtp2-moe-documents-recompute-full": ("model.mtp.depth=2", "data.document_mask=true",
                                          "train.recompute=full"),
    # The shipped deepseek_v3 / kimi_k2 setting: documents not masked (attention and positions
    # across them), the boundary loss kept, only the MTP targets whose chain crosses an EOS
    # masked; the MoE layers recomputed
    "mtp2-moe-unmasked-recompute-moe": ("model.mtp.depth=2", "data.document_mask=false",
                                        "train.recompute=moe"),
}


@pytest.mark.parametrize("case", CASES)
def test_trainer_equals_the_independent_reference(case, tmp_path):
    overrides = CASES[case]
    result = run_lockstep(tmp_path / "run", list(overrides))
    result.assert_equal()
    # The case exercises what it names.
    out = result.outputs
    if any("capacity" in o for o in overrides):
        assert any(step.dropped_frac > 0 for step in out)
    if BIAS[0] in overrides:
        assert all(b.abs().sum() > 0 for b in result.reference.bias.values())
    if "grad_clip=0" not in " ".join(overrides):
        assert any(step.grad_norm > 1.0 for step in out)  # clipped (optim.grad_clip=1)
    if "top_p" in " ".join(overrides):  # the threshold cuts some tokens, not all, to fewer
        assert all(len(set(step.taken_per_token)) > 1 for step in out)
    if "null" in " ".join(overrides):
        assert any(step.experts_per_token < 3 for step in out)
    if case.startswith("top-k"):
        assert [step.top_k for step in out] == [4, 3, 1]
    if "qk_clip" in " ".join(overrides):  # some heads were clipped (the update checks how)
        assert any(step.max_attn_logit > QK_CLIP for step in out)
        assert all("max_attn_logit" in record for record in result.records)
    print(f"{case}: worst rel. error {result.worst:.2e}",
          {k: f"{v:.1e}" for k, v in sorted(result.errors.items())})


@pytest.mark.parametrize("case", DOCUMENT_CASES)
def test_trainer_with_mtp_and_documents_equals_the_independent_reference(case, tmp_path):
    overrides = [*documents_overrides(), *DOCUMENT_CASES[case]]
    result = run_lockstep(tmp_path / "run", overrides)
    result.assert_equal()
    out = result.outputs
    assert all(step.boundaries > 0 for step in out)  # documents end inside the windows
    assert all(len(step.mtp_losses) == (2 if case.startswith("mtp2") else 1) for step in out)
    if "schedule" in case:
        assert [step.mtp_scale for step in out] == [0.3, 0.3, 0.1]
    if BIAS[0] in overrides:  # the MTP layers' experts are biased too
        assert all(b.abs().sum() > 0 for b in result.reference.bias.values())
        assert len(result.reference.bias) == 4  # 2 main MoE layers + 2 MTP modules
    if "qk-clip" in case:
        assert any(step.max_attn_logit > QK_CLIP for step in out)
        assert "mtp.0.block." in result.reference.head_max  # the MTP block's heads tracked too
    print(f"{case}: worst rel. error {result.worst:.2e}",
          {k: f"{v:.1e}" for k, v in sorted(result.errors.items())})


def test_a_resumed_trainer_equals_the_reference_that_never_stopped(tmp_path):
    """Saved at step 2 and resumed by a new trainer, against the reference that went on: the
    checkpoint must hold all the state the next step depends on (weights, AdamW, expert biases,
    step counter for the LR and sparsity schedules, sampler position) - in the global scope."""
    overrides = [*BIAS, "model.moe.lbl.scope=global", *CASES["top-k-and-capacity-schedules"]]
    result = run_lockstep(tmp_path / "run", overrides, resume_after=2)
    result.assert_equal()
    assert len(result.outputs) == 3 and result.records[-1]["step"] == 3


def test_a_resumed_muon_trainer_equals_the_reference_that_never_stopped(tmp_path):
    """Muon's momentum buffers (one per matrix and expert slice in the reference) and the
    AdamW moments of the rest come back from the checkpoint; QK-clip keeps acting."""
    overrides = ["optim=muon", f"optim.qk_clip_threshold={QK_CLIP}", *BIAS]
    result = run_lockstep(tmp_path / "run", overrides, resume_after=2)
    result.assert_equal()
    assert len(result.outputs) == 3 and result.records[-1]["step"] == 3
    assert "momentum_buffer" in result.errors
