"""Each real family's experiment (`+experiment=NAME`) on the meta-device path: two CPU ranks with
expert parallelism and FSDP train three steps and equal one process.

Widths (d_model and the MLP / expert widths) are narrowed to keep the suite's time: OLMoE-1B-7B
halved (its 0.4 B-parameter MoE layer at full width took ~70 s on the CI machine; the full
shapes go through the meta-device path in tests/distributed/test_initialisation.py and
scripts/bench_init.py), the others quartered (at full width Qwen3-30B-A3B and DeepSeek-V2-Lite
took ~150 s each and one layer of Mixtral-8x7B is 1.4 B expert parameters). Their expert
counts, heads, attention kinds and routing stay the experiment's.
Depth: the experiment's dense first layers plus one MoE layer; a small vocabulary (the tiny
corpus's tokenizer) and 32-token sequences. Whatever the experiment's model config holds (its
attention, norms, routing) is what runs: only those keys are overridden.
"""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import Layout, check_case, run_cases, run_layouts
from tests.harness import tiny_model_config

SMALL = ["model.vocab_size=8192", "data.seq_len=32", "train.global_batch_size=2",
         "train.micro_batch_size=1", "train.log_every=1", "optim.warmup_steps=0"]
NARROW = {"olmoe_1b_7b": ["model.d_model=1024", "model.head_dim=null", "model.moe.expert_hidden=512"],
          "mixtral_8x7b": ["model.d_model=1024", "model.ffn_hidden=3584",
                           "model.moe.expert_hidden=3584"],
          "qwen3_30b_a3b": ["model.d_model=512", "model.ffn_hidden=1536",
                            "model.moe.expert_hidden=192"],
          "deepseek_v2_lite": ["model.d_model=512", "model.ffn_hidden=2736",
                               "model.moe.expert_hidden=352",
                               "model.moe.shared_expert_hidden=352"]}
FAMILIES = ("olmoe_1b_7b", "qwen3_30b_a3b", "deepseek_v2_lite", "mixtral_8x7b")


def reference(family: str) -> list[str]:
    """The single-process run's overrides: the family at its dense layers + one MoE layer."""
    experiment = f"+experiment={family}"
    dense = tiny_model_config(experiment).moe.first_dense_layers
    return [experiment, f"model.n_layers={dense + 1}", *SMALL, *NARROW.get(family, [])]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_with_ep_and_fsdp_equals_one_process(family, tmp_path):
    references = {family: reference(family)}
    single = run_layouts(1, references, tmp_path / "single", timeout=900)
    case = Layout(("parallel.ep=2",), reference=family)  # FSDP over dp 2 (the default), EP 2
    runs = run_cases(2, {"ep2-fsdp": case}, tmp_path, references)
    check_case(runs, "ep2-fsdp", case, single)
