"""Multi-head latent attention under TP, CP (all-gather and ring) and PP in the real Trainer
against one process (K=3 steps, fp32, dropless; docs/equivalence.md): the latent projections,
their norms and the shared rotary key replicated over TP with summed gradients, keys and
values of different widths and the YaRN softmax scale through both CP attentions."""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import MLA, Layout, check_case, layouts_fixture

TWO_RANKS = {
    "mla-tp2": Layout(("parallel.tp=2",), "b4-mla"),
    "mla-cp2": Layout(("parallel.cp=2",), "b4-mla"),
    "mla-cp2-ring": Layout(("parallel.cp=2", "parallel.cp_comm=ring"), "b4-mla"),
    "mla-pp2": Layout(("parallel.pp=2",), "b4-mla"),
}
assert MLA  # the reference's model


two_ranks = layouts_fixture(2, TWO_RANKS)


@pytest.mark.parametrize("name", TWO_RANKS)
def test_latent_attention_layout_equals_one_process(name, two_ranks, references):
    check_case(two_ranks, name, TWO_RANKS[name], references)
