"""Multi-token prediction and packed-document masking on every layout, against one process
(the real Trainer, K=3 steps, fp32, dropless, micro-batch LBL; docs/equivalence.md).

Every run trains on short documents (tests/documents.py: several document boundaries in each
window of 128 tokens) with `data.document_mask=true` and MTP of depth 1 or 2 (an MoE block, so
the MTP layer takes part in the LBL, the routing statistics and the expert exchange). Rank 0's
logged loss, grad norm, aux and z losses, load CV, per-depth MTP losses (and, for the layouts
compared with the evaluating references, the validation losses) must equal the single-process
run's to rel. 1e-5 and every MoE layer's expert token counts exactly. What each layout proves:

- tp2, tp2-dp2: the MTP modules' sequence-parallel norms and colwise projection, the shared
  vocab-parallel embedding and head, the masked targets under the vocab-parallel loss;
- cp2 (all-gather), cp2-ring, tp2-cp2: documents crossing the zig-zag chunks; each chunk's
  shifted MTP targets come from the whole sequence; cp2 with Muon and QK-clip: each head's
  largest logit over its own document's keys, gathered from both CP ranks;
- pp2 (1f1b), pp2 interleaved, pp4 gpipe, pp2-tp2: the MTP modules on the last stage, the
  embedding they share with the first stage (its gradient summed over the two), a tied output
  head through the pipeline;
- dp2 (FSDP), dp2-replicated, ep2 (over DP), cp2-ep2 and tp2-ep2 (EP folded over CP / TP),
  ep2-etp2: the MTP layer's experts sharded and exchanged like any MoE layer's;
- the 8-rank pp2-tp2-cp2-ep2: everything at once.

Each layout kind runs at depth 1 and at depth 2 (tp, ep over DP / CP / TP, etp, cp all-gather
and ring, pp 1f1b / interleaved / gpipe, dp2 FSDP and replicated, 8 ranks). The `-unmasked`
cases train on the same documents with `data.document_mask=false`, the shipped deepseek_v3 and
kimi_k2 experiments' setting (attention and RoPE positions across the documents; the MTP targets
whose chain crosses an EOS still masked): tp2, cp2, pp2, ep2 (over FSDP) and the 8 ranks. The
`-recompute-*` cases recompute (`train.recompute=full`: the whole block, its document positions
included; `=moe`) against the reference that does not: cp2 ring and dp2 (full), pp2 interleaved
and dp2 replicated (moe). tests/oracle/test_oracle.py checks the references' paths (unmasked,
recomputed) against the independent reference.
"""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import (B4, EVAL, MUON, Layout, check_case, rel_err,
                                           run_cases, run_layouts)
from tests.documents import documents_overrides

MTP1 = ("model.mtp.depth=1",)
MTP2 = ("model.mtp.depth=2",)
DOCS = ("data.document_mask=true",)
# The shipped deepseek_v3 / kimi_k2 experiments' setting: attention and positions across the
# documents of a window, only the MTP targets whose chain crosses an EOS masked.
UNMASKED = ("data.document_mask=false",)
# Recomputation is a layout override only: the layout recomputes, its reference does not.
RECOMPUTE_FULL = ("train.recompute=full",)
RECOMPUTE_MOE = ("train.recompute=moe",)
# lambda from a schedule (0.3 then 0.1 from step 2, as DeepSeek-V3 lowered it), the EOS ->
# next-document target masked too, and a tied output head.
VARIANT = ("model.mtp.loss_scale_schedule.kind=step",
           "model.mtp.loss_scale_schedule.milestones=[[2,0.1]]", "data.boundary_loss=mask",
           "model.tie_embeddings=true")


def _references() -> dict[str, list[str]]:
    docs = [*documents_overrides(), *DOCS]
    return {
        "mtp2": [*B4, *docs, *MTP2, *EVAL],
        "mtp1": [*B4, *docs, *MTP1, *VARIANT],
        "mtp1-mb1": [*B4, *docs, *MTP1, "train.micro_batch_size=1"],
        "mtp2-mb1": [*B4, *docs, *MTP2, "train.micro_batch_size=1", *VARIANT],
        # Muon and QK-clip: each head's largest logit over its own document's keys only
        "mtp1-muon": [*B4, *docs, *MTP1, *MUON],
        # the same documents, not masked
        "mtp1-unmasked": [*B4, *documents_overrides(), *UNMASKED, *MTP1],
        "mtp2-unmasked": [*B4, *documents_overrides(), *UNMASKED, *MTP2],
    }


TWO_RANKS = {
    "tp2": Layout(("parallel.tp=2",), "mtp2"),
    "cp2": Layout(("parallel.cp=2",), "mtp2"),
    "cp2-ring": Layout(("parallel.cp=2", "parallel.cp_comm=ring"), "mtp1"),
    # QK-clip's per-head maxima under the document mask, the keys split over the CP ranks
    "cp2-muon-qk-clip": Layout(("parallel.cp=2",), "mtp1-muon"),
    "pp2-1f1b": Layout(("parallel.pp=2",), "mtp2"),
    "pp2-interleaved": Layout(("parallel.pp=2", "parallel.vpp=2",
                               "parallel.pp_schedule=interleaved"), "mtp1"),
    "dp2": Layout((), "mtp1"),
    "dp2-replicated-ep2": Layout(("parallel.fsdp.enabled=false", "parallel.ep=2"), "mtp2"),
    # the other depth of each layout kind, the documents unmasked, recomputation
    "tp2-unmasked": Layout(("parallel.tp=2",), "mtp1-unmasked"),
    "cp2-unmasked": Layout(("parallel.cp=2",), "mtp2-unmasked"),
    "cp2-ring-recompute-full": Layout(("parallel.cp=2", "parallel.cp_comm=ring",
                                       *RECOMPUTE_FULL), "mtp2"),
    "pp2-1f1b-unmasked": Layout(("parallel.pp=2",), "mtp1-unmasked"),
    "pp2-interleaved-recompute-moe": Layout(("parallel.pp=2", "parallel.vpp=2",
                                             "parallel.pp_schedule=interleaved",
                                             *RECOMPUTE_MOE), "mtp2"),
    "dp2-recompute-full": Layout(RECOMPUTE_FULL, "mtp2"),
    "dp2-replicated-recompute-moe": Layout(("parallel.fsdp.enabled=false", *RECOMPUTE_MOE),
                                           "mtp1"),
    "ep2-unmasked": Layout(("parallel.ep=2",), "mtp1-unmasked"),
}
FOUR_RANKS = {
    "tp2-dp2": Layout(("parallel.tp=2",), "mtp1"),
    "tp2-cp2": Layout(("parallel.tp=2", "parallel.cp=2"), "mtp2"),
    "pp2-tp2": Layout(("parallel.pp=2", "parallel.tp=2"), "mtp1"),
    "pp4-gpipe": Layout(("parallel.pp=4", "parallel.pp_schedule=gpipe"), "mtp2-mb1"),
    "cp2-ep2": Layout(("parallel.cp=2", "parallel.ep=2"), "mtp1"),
    "tp2-ep2": Layout(("parallel.tp=2", "parallel.ep=2"), "mtp2"),
    "ep2-etp2": Layout(("parallel.ep=2", "parallel.etp=2"), "mtp1-mb1"),
    "ep2-etp2-mtp2": Layout(("parallel.ep=2", "parallel.etp=2"), "mtp2-mb1"),
    "pp4-gpipe-mtp1": Layout(("parallel.pp=4", "parallel.pp_schedule=gpipe"), "mtp1-mb1"),
    "tp2-ep2-mtp1": Layout(("parallel.tp=2", "parallel.ep=2"), "mtp1"),
}
EIGHT_RANKS = {
    "pp2-tp2-cp2-ep2": Layout(("parallel.pp=2", "parallel.tp=2", "parallel.cp=2",
                               "parallel.ep=2"), "mtp2"),
    "pp2-tp2-cp2-ep2-mtp1": Layout(("parallel.pp=2", "parallel.tp=2", "parallel.cp=2",
                                    "parallel.ep=2"), "mtp1"),
    "pp2-tp2-cp2-ep2-unmasked": Layout(("parallel.pp=2", "parallel.tp=2", "parallel.cp=2",
                                        "parallel.ep=2"), "mtp1-unmasked"),
}


@pytest.fixture(scope="module")
def mtp_refs():
    return _references()


@pytest.fixture(scope="module")
def mtp_references(mtp_refs, tmp_path_factory):
    return run_layouts(1, mtp_refs, tmp_path_factory.mktemp("mtp_references"))


@pytest.fixture(scope="module")
def two_ranks(mtp_refs, tmp_path_factory):
    return run_cases(2, TWO_RANKS, tmp_path_factory.mktemp("mtp_two"), mtp_refs)


@pytest.fixture(scope="module")
def four_ranks(mtp_refs, tmp_path_factory):
    return run_cases(4, FOUR_RANKS, tmp_path_factory.mktemp("mtp_four"), mtp_refs)


@pytest.fixture(scope="module")
def eight_ranks(mtp_refs, tmp_path_factory):
    return run_cases(8, EIGHT_RANKS, tmp_path_factory.mktemp("mtp_eight"), mtp_refs)


def test_the_references_train_with_mtp_and_documents(mtp_references):
    """The single-process runs exercise what the layouts are compared on: MTP losses per depth
    near ln(V) at the start and lowered by training, evaluation of every depth, the MTP layers' routing
    rows after the main model's (3 + depth MoE layers)."""
    for name, recs in mtp_references.records.items():
        depth = 2 if name.startswith("mtp2") else 1
        assert [len(r["tokens_per_expert"]) for r in recs] == [3 + depth] * 3, name
        for k in range(1, depth + 1):
            losses = [r[f"mtp_loss/{k}"] for r in recs]
            # (3 steps of the tiny recipe's lr: a deep MTP loss may rise again at step 3)
            assert 8 < losses[0] < 10 and min(losses[1:]) < losses[0], (name, k, losses)
    assert {"val_loss", "val_mtp_loss/1", "val_mtp_loss/2"} <= set(mtp_references.records["mtp2"][-1])
    # Unmasked, attention reads across the documents: the first step's losses differ
    masked, unmasked = mtp_references.records["mtp2"][0], mtp_references.records["mtp2-unmasked"][0]
    assert all(rel_err(unmasked[k], masked[k]) > 1e-4 for k in ("loss", "mtp_loss/1", "mtp_loss/2")), \
        (masked, unmasked)
    # QK-clip acts in the Muon reference: the first step's largest logit is over the threshold
    logits = [r["max_attn_logit"] for r in mtp_references.records["mtp1-muon"]]
    assert logits[0] > 0.3 and max(logits[1:]) < logits[0], logits


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_rank_layout_with_mtp_and_documents_equals_one_process(name, two_ranks,
                                                                    mtp_references):
    check_case(two_ranks, name, TWO_RANKS[name], mtp_references)


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_rank_layout_with_mtp_and_documents_equals_one_process(name, four_ranks,
                                                                     mtp_references):
    check_case(four_ranks, name, FOUR_RANKS[name], mtp_references)


@pytest.mark.parametrize("name", EIGHT_RANKS)
def test_five_dimensional_layout_with_mtp_and_documents_equals_one_process(name, eight_ranks,
                                                                           mtp_references):
    check_case(eight_ranks, name, EIGHT_RANKS[name], mtp_references)
