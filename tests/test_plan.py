"""The planner: parameter counts against published figures, a hand-computed tiny case, memory
sharding tensor by tensor, a step's collectives and seconds by hand, the layout search, and the
command line."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from moetrain.config import compose, to_object
from moetrain.hardware import HardwareError, hardware
from moetrain.layout_search import RESERVED_GIB, search_layouts
from moetrain.parallel import check_layout
from moetrain.parallel.dims import ParallelDims
from moetrain.plan_comm import Collective, step_collectives
from moetrain.planning import (
    count_parameters, flops_per_token, granularity, layer_activation_bytes, layer_activation_parts,
    make_plan, memory_per_rank, rank_memory,
)
from moetrain.step_time import LATENCY_S, LINK_EFFICIENCY, collective_seconds, estimate_step


def config(name, *overrides):
    return to_object(compose([f"+experiment={name}", *overrides]))


def billions(n):
    return n / 1e9


# -- real shapes against the published figures -------------------------------------------------

def test_mixtral_8x7b_matches_the_published_46_7b_total_12_9b_active():
    p = count_parameters(config("mixtral_8x7b").model)
    assert billions(p.n_total) == pytest.approx(46.7, rel=0.01)
    assert billions(p.n_active) == pytest.approx(12.9, rel=0.01)
    # The exact count of the released checkpoint (same shapes, no biases): 46,702,792,704.
    assert p.n_total == 46_702_792_704


@pytest.mark.parametrize("name, total, active, exact", [
    # exact: transformers' model of the same config (tests/hf/test_families.py builds it)
    ("olmoe_1b_7b", 6.9, 1.3, 6_919_161_856),
    ("qwen3_30b_a3b", 30.5, 3.3, 30_532_122_624),
])
def test_family_configs_match_the_published_figures_exactly(name, total, active, exact):
    p = count_parameters(config(name).model)
    assert p.n_total == exact  # q/k norm weights included
    assert billions(p.n_total) == pytest.approx(total, rel=0.01)
    assert billions(p.n_active) == pytest.approx(active, rel=0.03)


def mla_attention_params(d=2048, heads=16, nope=128, rope=64, kv_rank=512, v_head=128):
    """DeepSeek-V2-Lite's multi-head latent attention (no query compression in the Lite model)."""
    q_proj = d * heads * (nope + rope)
    kv_a = d * (kv_rank + rope) + kv_rank  # down-projection (+ shared rope key) and its norm
    kv_b = kv_rank * heads * (nope + v_head)
    o_proj = heads * v_head * d
    return q_proj + kv_a + kv_b + o_proj


def test_deepseek_v2_lite_is_the_published_15_7b_with_latent_attention():
    model = config("deepseek_v2_lite").model
    p = count_parameters(model)
    assert p.total["attention"] == model.n_layers * mla_attention_params()
    assert p.n_total == 15_706_484_224  # transformers' DeepseekV2ForCausalLM of this config
    # DeepSeek's 2.4B "activated" leaves out the input embedding (a lookup); we count it.
    assert billions(p.n_active - p.active["embedding"]) == pytest.approx(2.4, rel=0.03)


def mla_q_lora(d, heads, q_rank, kv_rank=512, nope=128, rope=64, v_head=128):
    """Multi-head latent attention with low-rank queries (DeepSeek-V3, Kimi K2): q_a_proj, its
    norm, q_b_proj; kv_a_proj_with_mqa (latent + shared rotary key), its norm, kv_b_proj; o_proj."""
    q = d * q_rank + q_rank + q_rank * heads * (nope + rope)
    kv = d * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_head)
    return q + kv + heads * v_head * d


def deepseek_v3_style(V, d, L, dense, F, E, Fe, shared, heads):
    """Parameters of a DeepSeek-V3-architecture config.json (no MTP module, no router bias):
    embeddings and head untied, 2 norms per layer + the final one, SwiGLU MLPs of 3 d F."""
    attention = mla_q_lora(d, heads, 1536)
    moe = E * d + 3 * d * Fe * E + 3 * d * Fe * shared
    return 2 * V * d + d + L * (attention + 2 * d) + dense * 3 * d * F + (L - dense) * moe


# From the released config.json files (vocab_size, hidden_size, num_hidden_layers,
# first_k_dense_replace, intermediate_size, n_routed_experts, moe_intermediate_size,
# n_shared_experts, num_attention_heads; q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128,
# v 128 for both), by hand:
DEEPSEEK_V3 = deepseek_v3_style(129_280, 7168, 61, 3, 18_432, 256, 2048, 1, 128)
KIMI_K2 = deepseek_v3_style(163_840, 7168, 61, 1, 18_432, 384, 2048, 1, 64)
# Qwen3-235B-A22B: 94 layers, d 4096, 64 / 4 heads of 128 with q/k norms, 128 experts of 1536
QWEN3_235B = 2 * 151_936 * 4096 + 4096 + 94 * (
    4096 * (64 + 2 * 4) * 128 + 64 * 128 * 4096 + 2 * 128 + 2 * 4096
    + 128 * 4096 + 3 * 4096 * 1536 * 128)


@pytest.mark.parametrize("name, exact, published_total, published_active", [
    # DeepSeek-V3 report: 671B total, 37B activated (its README: 36.6B without the input
    # embedding, the 0.9B output head included)
    ("deepseek_v3", DEEPSEEK_V3, 671e9, 36.6e9),
    # Kimi K2 model card: 1T total, 32B activated (the tech report's table says 1.04T; the
    # released shapes give 1.026T)
    ("kimi_k2", KIMI_K2, 1.0e12, 32e9),
    # Qwen3 report: 235B total, 22B activated
    ("qwen3_235b_a22b", QWEN3_235B, 235e9, 22e9),
])
def test_frontier_shapes_have_their_published_parameter_counts(name, exact, published_total,
                                                                published_active):
    # The main model: the deepseek_v3 and kimi_k2 experiments add an MTP module, which the
    # published figures leave out (test_deepseek_v3_main_model_and_mtp_module_as_released).
    p = count_parameters(config(name, "model.mtp.depth=0").model)
    assert p.n_total == exact
    assert p.n_total == pytest.approx(published_total, rel=0.03)
    assert p.n_active - p.active["embedding"] == pytest.approx(published_active, rel=0.03)


def test_frontier_exact_totals():
    """The integers docs/planning.md quotes; the checkpoints also hold one fp32 router bias per
    MoE layer and expert (e_score_correction_bias: a buffer in moetrain and transformers)."""
    assert DEEPSEEK_V3 == 671_026_404_352 and DEEPSEEK_V3 + 58 * 256 == 671_026_419_200
    assert KIMI_K2 == 1_026_408_209_408 and KIMI_K2 + 60 * 384 == 1_026_408_232_448
    assert QWEN3_235B == 235_093_634_560


def test_granularity_of_the_real_shapes():
    assert granularity(config("mixtral_8x7b").model) == 1.0
    assert granularity(config("olmoe_1b_7b").model) == 8.0
    assert granularity(config("qwen3_30b_a3b").model) == 8.0


# -- the tiny model, by hand ---------------------------------------------------------------------

# tiny: V 8192, d 128, 4 layers (the first dense), 8 heads / 4 KV heads of 16, ffn 384,
# 8 experts of 192, top-2, untied.
TINY_TOTAL = {
    "embedding": 8192 * 128,  # 1,048,576
    "attention": 4 * (128 * 128 + 2 * 128 * 64 + 128 * 128),  # 196,608
    "dense_mlp": 3 * 128 * 384,  # 147,456
    "routed_experts": 3 * 8 * 3 * 128 * 192,  # 1,769,472
    "shared_experts": 0,
    "router": 3 * 8 * 128,  # 3,072
    "norms": 4 * 2 * 128 + 128,  # 1,152
    "output": 8192 * 128,
    "mtp": 0,  # model.mtp.depth = 0
}


def test_tiny_parameters_and_flops_by_hand():
    model = config("tiny").model
    p = count_parameters(model)
    assert p.total == TINY_TOTAL and p.n_total == 4_214_912
    assert p.active["routed_experts"] == 3 * 2 * 3 * 128 * 192 and p.n_active == 2_887_808
    assert p.n_active_matmul == 196_608 + 147_456 + 442_368 + 3_072 + 1_048_576  # 1,838,080
    f = flops_per_token(model, seq_len=128)
    assert f.matmul_forward == 2 * 1_838_080
    assert f.attention_forward == 4 * 4 * 128 * 8 * 16  # 4 L S H h = 262,144
    assert f.train == 3 * (3_676_160 + 262_144) == 11_814_912
    assert flops_per_token(model, 128, causal=True).attention_forward == 131_072
    assert count_parameters(model, top_k=1).n_active == 2_887_808 - 3 * 3 * 128 * 192


@pytest.mark.parametrize("overrides", [
    [],
    ["model.tie_embeddings=true", "model.moe.num_shared_experts=2",
     "model.moe.shared_expert_hidden=64", "model.moe.first_dense_layers=0", "model.head_dim=32"],
    ["model.mtp.depth=2", "model.moe.num_shared_experts=1"],
    ["model.mtp.depth=1", "model.mtp.block=dense", "model.tie_embeddings=true"],
])
def test_counts_equal_the_built_model(overrides):
    import torch

    from moetrain.model import MoELayer, Transformer

    model_cfg = config("tiny", *overrides).model
    with torch.device("meta"):
        model = Transformer(model_cfg)
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    # Per token, each MoE layer uses top_k of its E routed experts.
    idle = sum(sum(p.numel() for p in m.experts.parameters()) * (m.router.num_experts - m.top_k)
               // m.router.num_experts for m in model.modules() if isinstance(m, MoELayer))
    active = total - idle
    p = count_parameters(model_cfg)
    assert (p.n_total, p.n_active) == (total, active)
    mtp = sum(q.numel() for n, q in model.named_parameters() if n.startswith("mtp."))
    assert p.total["mtp"] == mtp and p.n_main == total - mtp


def test_mtp_parameters_and_flops_of_the_tiny_model():
    """One MoE MTP module on the tiny model, by hand: its attention (49,152), routed experts
    (8 x 3 x 128 x 192 = 589,824; top-2 active: 147,456), router (1,024), projection
    [256 -> 128] (32,768), norms (2 x 128 in its block, enorm, hnorm and the final one:
    5 x 128). Its forward multiplies by the active matmul weights and by the shared output
    head (8192 x 128) once more; its block attends like the main model's four."""
    model = config("tiny", "model.mtp.depth=1").model
    p = count_parameters(model)
    assert p.total["mtp"] == 49_152 + 589_824 + 1_024 + 32_768 + 5 * 128 == 673_408
    assert p.active["mtp"] == 673_408 - 589_824 + 147_456 == 231_040
    assert p.n_active_matmul == 1_838_080 + (49_152 + 147_456 + 1_024 + 32_768) + 1_048_576
    f = flops_per_token(model, 128)
    assert f.matmul_forward == 2 * 3_117_056
    assert f.attention_forward == 4 * (4 + 1) * 128 * 8 * 16


def test_deepseek_v3_main_model_and_mtp_module_as_released():
    """DeepSeek-V3's MTP layer (model.layers.61 of the released checkpoint), tensor by tensor:
    256 routed experts of 3 x 7168 x 2048, the shared expert, the router, MLA (q_a 7168 x 1536,
    its norm, q_b 1536 x 128 x 192, kv_a_proj_with_mqa 7168 x 576, its norm 512, kv_b
    512 x 128 x 256, o_proj 128 x 128 x 7168), five norms of 7168 (its block's two, enorm,
    hnorm, shared_head.norm) and eh_proj 7168 x 14336: 11.61 B unique parameters. The
    checkpoint stores the shared embedding and head again in that layer (2 x 129280 x 7168):
    671.03 B + 13.47 B = 684.49 B, the "685B" of the model card with its FP8 scales, of which
    DeepSeek counts 671 B for the main model and 14 B for the MTP module."""
    model = config("deepseek_v3").model
    p = count_parameters(model)
    mla = 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 \
        + 128 * 128 * 7168
    layer_61 = (256 * 3 * 7168 * 2048 + 3 * 7168 * 2048 + 256 * 7168 + mla + 5 * 7168
                + 7168 * 14336)
    assert p.total["mtp"] == layer_61 == 11_610_067_968
    assert round(p.n_main / 1e9) == 671
    copies = 2 * 129280 * 7168
    assert p.n_total + copies == 684_489_830_400
    # Kimi K2's shapes with the same module: 384 experts, 64 heads
    kimi = count_parameters(config("kimi_k2").model)
    assert kimi.total["mtp"] > 0 and round(kimi.n_main / 1e9) == 1026


# -- memory --------------------------------------------------------------------------------------

def test_tiny_memory_sharding_by_hand():
    cfg = config("tiny", "parallel.tp=2", "parallel.ep=2")
    dims = ParallelDims.from_config(cfg.parallel, 4)  # dp 2, edp 2
    (stage,) = memory_per_rank(cfg, dims)
    # Dense per rank: attention, dense MLP, embedding and output (vocab-split) over tp 2, then
    # FSDP over dp_cp 2; the norms replicated over TP, FSDP over dp_cp; the routers replicated
    # over TP (MoE layers are folded), FSDP over every token rank, dp_cp_tp = 4.
    dense = (4 * 49_152 + 147_456 + 2 * 1_048_576) / 4 + (4 * 256 + 128) / 2 + 3 * 1_024 / 4
    assert stage.dense_params == dense == 611_648
    assert stage.expert_params == 1_769_472 / 2 / 2 == 442_368  # ep 2, then FSDP over edp 2
    n = 611_648 + 442_368
    assert (stage.weights, stage.grads, stage.optimizer) == (4 * n, 4 * n, 8 * n)
    # Initialisation: the weights plus the generator's temporaries (24 B per element) for the
    # largest shard, the embedding's 8192 x 128 / tp 2 / dp 2 = 2^18 elements (<= one chunk).
    assert stage.init_peak == 4 * n + 24 * 2**18
    # optim=muon: one momentum buffer (4 B) for the attention, dense MLP and expert matrices,
    # AdamW's 8 B for the embedding, output, norms and routers
    muon = config("tiny", "parallel.tp=2", "parallel.ep=2", "optim=muon")
    (with_muon,) = memory_per_rank(muon, dims)
    matrices = (4 * 49_152 + 147_456) / 4 + 442_368
    assert with_muon.optimizer == 4 * matrices + 8 * (n - matrices)
    no_fsdp = config("tiny", "parallel.tp=2", "parallel.ep=2", "parallel.fsdp.enabled=false")
    (replicated,) = memory_per_rank(no_fsdp, dims)
    assert replicated.dense_params == 1_224_832 and replicated.fsdp_buffers == 0


def test_pipeline_stages_partition_the_parameters():
    cfg = config("tiny", "parallel.pp=2")
    for world in (2, 4):  # 4: FSDP halves each stage's share over dp 2
        dims = ParallelDims.from_config(cfg.parallel, world)
        stages = memory_per_rank(cfg, dims)
        held = sum((m.dense_params + m.expert_params) * dims.dp for m in stages)
        assert held == 4_214_912
    # 1F1B: stage 0 holds pp micro-batches in flight, the last stage one.
    dims = ParallelDims.from_config(cfg.parallel, 2)
    first, last = memory_per_rank(cfg, dims)
    one = [layer_activation_bytes(cfg.model, i, 2 * 128, dims, 2) for i in range(4)]
    assert first.activations == 2 * (one[0] + one[1]) and last.activations == one[2] + one[3]
    assert first.logits == 0 and last.logits == (2 + 4) * 2 * 128 * 8192


def test_activation_bytes_by_hand_and_their_parallel_split():
    cfg = config("tiny")
    model = cfg.model
    dims = ParallelDims(1)
    # Per token: attention 2d + 2q + 2kv + 2H + ffn input 2d = 256+256+128+16+256 = 912 elements.
    assert layer_activation_bytes(model, 0, 256, dims, 2) == 2 * 256 * (912 + 3 * 384)
    # MoE layer: + k (2d + 3F) + 2*2E = 2 (256 + 576) + 32.
    moe_bytes = 2 * 256 * (912 + 2 * (256 + 576) + 32)
    assert layer_activation_bytes(model, 1, 256, dims, 2) == moe_bytes == 1_335_296
    tp2 = ParallelDims(2, tp=2)
    assert layer_activation_bytes(model, 1, 256, tp2, 2) == moe_bytes / 2
    plan = make_plan(cfg, dims)
    assert plan.memory[0].activations == 2 * 256 * (912 + 1152) + 3 * moe_bytes


def test_a_top_k_schedule_plans_for_its_peak_k():
    S = "model.moe.schedule.top_k"
    cfg = config("tiny", "train.max_steps=200", f"{S}.kind=linear", f"{S}.start=1",
                 f"{S}.end=6", f"{S}.start_step=50", f"{S}.end_step=100")
    plan = make_plan(cfg, ParallelDims(1))
    assert plan.top_k_range == (1, 6) and plan.top_k == 6
    assert plan.params.n_active == count_parameters(cfg.model, top_k=6).n_active
    # The run stops before the ramp ends: the peak is where it stops (step 74: 1 + 5 * 24/50).
    cfg = config("tiny", "train.max_steps=75", f"{S}.kind=linear", f"{S}.start=1",
                 f"{S}.end=6", f"{S}.start_step=50", f"{S}.end_step=100")
    assert make_plan(cfg, ParallelDims(1)).top_k_range == (1, 3)
    assert make_plan(config("tiny"), ParallelDims(1)).top_k_range == (2, 2)


# -- the command line ------------------------------------------------------------------------------

def start_plan(*args):
    return subprocess.Popen([sys.executable, "-m", "moetrain.plan", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_json_and_invalid_layout():
    # Both at once: each spends most of its ~2 s importing torch.
    ok = start_plan("+experiment=tiny", "--world-size", "4", "parallel.tp=2", "--json")
    bad = start_plan("+experiment=tiny", "parallel.ep=3")
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    plan = json.loads(out)
    assert plan["params"]["total"] == 4_214_912 and plan["params"]["active"] == 2_887_808
    assert plan["layout"]["dp"] == 2 and plan["flops_per_token"]["train"] == 11_814_912
    assert plan["memory_bytes"]["per_rank"]["total"] > 0

    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and out == ""
    assert err.startswith("error: ") and "parallel.ep" in err
    assert "model.moe.num_experts" in err and len(err.strip().splitlines()) == 1


def test_cli_table_and_errors_in_process(capsys):
    from moetrain.plan import main

    assert main(["+experiment=mixtral_8x7b", "--world-size", "64", "parallel.tp=2",
                 "parallel.ep=8", "parallel.pp=4"]) == 0
    out = capsys.readouterr().out
    assert "46.70 B" in out and "12.88 B" in out and "<- peak" in out
    assert "world 64: dense tp2 cp1 dp8 pp4, MoE ep8 etp1 edp2" in out
    assert main(["+experiment=tiny", "--world-size", "3", "parallel.tp=2"]) == 2
    assert "parallel.tp" in capsys.readouterr().err
    assert main(["+experiment=tiny", "model.moe.top_k=9"]) == 2
    assert "model.moe.top_k" in capsys.readouterr().err
    # Whether the logging backends are installed here says nothing about the plan.
    assert main(["+experiment=tiny", "logging.tensorboard=true", "logging.wandb.enabled=true"]) == 0


def test_uneven_shards_are_fsdp2_padded_chunks_by_hand():
    """vocab 8190 over tp2 then FSDP over dp2: 4095 rows per TP rank, chunked 2048 / 2047 over
    the data-parallel ranks, each storing 2048 (FSDP2 pads dim 0 to a multiple of the group)."""
    cfg = config("tiny", "model.vocab_size=8190", "parallel.tp=2")
    dims = ParallelDims.from_config(cfg.parallel, 4)  # ranks 0, 1: dp 0; ranks 2, 3: dp 1
    first, last = rank_memory(cfg, dims, 0), rank_memory(cfg, dims, 3)
    assert first.dense_params == 611_648  # as with 8192: 2048 embedding and output rows
    assert last.dense_params == 611_648 - 2 * 128  # one row fewer of each
    assert first.weights == last.weights  # the same padded storage
    # Four micro-batches per step (16 / (2 x dp 2)): FSDP2 keeps every unit's unsharded (TP-
    # sharded) fp32 gradient between them: attention and MLP halves, replicated norms, 4095
    # vocab rows of both matrices, routers and all experts (ep 1).
    unsharded = 4 * 49_152 // 2 + 147_456 // 2 + (4 * 256 + 128) + 2 * 4095 * 128 \
        + 3 * 1024 + 3 * 589_824
    assert first.grad_accum == 4 * unsharded == 4 * 2_994_048
    # Gathered at once: the root (padded: 2 x 2048 rows of each matrix + the final norm) and the
    # two largest other units, the MoE layers over dp_cp_tp (experts + router).
    assert first.fsdp_buffers == 4 * ((2 * 2 * 2048 * 128 + 128) + 2 * (589_824 + 1024))
    one_micro = config("tiny", "model.vocab_size=8190", "parallel.tp=2",
                       "train.global_batch_size=4")
    assert rank_memory(one_micro, dims, 0).grad_accum == 0  # nothing to accumulate


def test_recompute_keeps_block_inputs_by_hand():
    cfg = config("tiny")
    dims = ParallelDims(1)
    tokens = 2 * 128
    parts = [layer_activation_parts(cfg.model, i, tokens, dims, 2) for i in range(4)]
    none = make_plan(cfg, dims).memory[0].activations
    assert none == sum(a + f for a, f in parts)
    full = make_plan(config("tiny", "train.recompute=full"), dims).memory[0].activations
    # each block keeps its fp32 input; one block lives again while it is recomputed
    assert full == 4 * (4 * 128 * tokens) + max(a + f for a, f in parts)
    moe = make_plan(config("tiny", "train.recompute=moe"), dims).memory[0].activations
    assert moe == sum(parts[0]) + sum(a for a, _ in parts[1:]) + max(f for _, f in parts[1:])
    assert full < moe < none


def test_a_steps_collectives_by_hand():
    """dp2 with FSDP, 4 micro-batches per rank: each block unit gathered for every forward and
    backward (8 times), the root once per micro-batch; one reduce-scatter each; one reduction."""
    cfg = config("tiny")
    calls = step_collectives(cfg, ParallelDims(2), 0)
    fsdp = [(c.op, c.bytes, c.count) for c in calls if c.what == "fsdp"]
    block0 = 4 * (49_152 + 256 + 147_456)
    moe_block = 4 * (49_152 + 256 + 1024 + 589_824)
    root = 4 * (2 * 1_048_576 + 128)
    assert fsdp == [("all_gather", block0, 8), ("reduce_scatter", block0, 1)] + \
        [("all_gather", moe_block, 8), ("reduce_scatter", moe_block, 1)] * 3 + \
        [("all_gather", root, 4), ("reduce_scatter", root, 1)]
    (sums,) = [c for c in calls if c.what == "step sums"]
    # loss sum and target count, norm, stop, peak memory per rank, 3 stats rows
    assert sums.bytes == 8 * (4 + 2 + 3 * (7 + 2 * 8))
    # MTP depth 2 (a sum and a count each, two more MoE stats rows: MoE MTP blocks) and QK-clip
    # (each rank's [4 layers + 2 MTP blocks, 8 heads] table)
    mtp = config("tiny", "model.mtp.depth=2", "model.mtp.block=moe", "optim=muon",
                 "optim.qk_clip_threshold=100")
    (sums,) = [c for c in step_collectives(mtp, ParallelDims(2), 0) if c.what == "step sums"]
    assert sums.bytes == 8 * (4 + 2 * 2 + 2 + 5 * (7 + 2 * 8) + 2 * (4 + 2) * 8)
    # ep2: per MoE layer and micro-batch the counts and four row exchanges (tokens x k x d):
    # the dispatch moves the fp32 norm output, the combine the experts' bf16 output (device
    # auto plans a GPU run under bf16 autocast)
    calls = step_collectives(config("tiny", "parallel.ep=2"), ParallelDims(2, ep=2), 0)
    rows = 2 * 128 * 2 * 128  # micro-batch tokens x top-2 x d_model
    ep = {(c.what, c.bytes, c.count) for c in calls if c.group == "ep"}
    assert ep == {("ep counts", 8 * 8, 12), ("ep dispatch", 4 * rows, 12),
                  ("ep combine", 2 * rows, 12), ("ep combine grad", 2 * rows, 12),
                  ("ep dispatch grad", 4 * rows, 12)}


def test_mtp_eh_proj_output_is_an_all_to_all_on_gpus_and_an_all_gather_on_cpu():
    """Under TP each MTP module's projection output goes from feature shards to sequence shards
    (and its gradient back): DTensor's one all-to-all of the rank's [B, S, d/tp] shard off CPU
    (bf16 under the GPU's autocast), an all-gather of the whole [B, S, d] on gloo (fp32 here).
    test_plan_collectives.py records the CPU form in real steps and the recorder's GPU form."""
    seq = 2 * 128 * 128  # micro-batch tokens x d_model
    for device, expected in (("auto", ("all_to_all", 2 * seq // 2)),
                             ("cpu", ("all_gather", 4 * seq))):
        cfg = config("tiny", "parallel.tp=2", "model.mtp.depth=1", f"train.device={device}")
        calls = step_collectives(cfg, check_layout(cfg, 2), 0)
        eh = [(c.op, c.bytes, c.count) for c in calls if c.what == "mtp tp eh_proj output"]
        assert eh == [(*expected, 2 * 8)]  # forward and backward of 8 micro-batches


def test_collective_seconds_by_hand():
    gpu = hardware("h100")  # NVLink 450 GB/s, network 50 GB/s, 8 per node
    nvlink, net = 450e9 * LINK_EFFICIENCY, 50e9 * LINK_EFFICIENCY
    inside = Collective("all_gather", "dp_cp", tuple(range(8)), 2**30, 1, "fsdp")
    assert collective_seconds(inside, gpu, 0) == pytest.approx(7 / 8 * 2**30 / nvlink + LATENCY_S)
    across = Collective("all_reduce", "dp_cp", (0, 8), 2**30, 1, "x")
    assert collective_seconds(across, gpu, 0) == pytest.approx(2**30 / net + LATENCY_S)
    # all-to-all over 16 ranks on two nodes: 7/16 over NVLink while 8/16 crosses the network
    a2a = Collective("all_to_all", "ep", tuple(range(16)), 2**30, 1, "ep")
    assert collective_seconds(a2a, gpu, 3) == pytest.approx(8 / 16 * 2**30 / net + LATENCY_S)
    assert collective_seconds(Collective("all_reduce", "tp", (5,), 2**30, 1, "x"), gpu, 5) == 0


def test_step_estimate_is_consistent():
    cfg = config("qwen3_30b_a3b", "parallel.ep=8")
    dims = ParallelDims(16, ep=8)
    est = estimate_step(cfg, dims, hardware("h100"))
    tokens = 512 * 4096
    assert est.tokens_per_s_per_gpu == pytest.approx(tokens / est.step_s / 16)
    flops = make_plan(cfg, dims).flops.train
    assert est.model_tflops_per_gpu == pytest.approx(est.tokens_per_s_per_gpu * flops / 1e12)
    assert est.mfu == pytest.approx(est.model_tflops_per_gpu / 989)
    # two nodes: the EP groups stay inside one, the FSDP groups of 2 (edp) cross them
    slow = est.slowest
    assert slow.compute_s > 0 and slow.exposed_comm_s > 0 and est.bubble_s == 0
    on_b200 = estimate_step(cfg, dims, hardware("b200"))
    assert on_b200.step_s < est.step_s  # faster everything
    # replicated data parallelism: FSDP2's all-reduces run on its stream, hidden like FSDP's
    replicated = estimate_step(config("qwen3_30b_a3b", "parallel.ep=8",
                                      "parallel.fsdp.enabled=false"), dims, hardware("h100"))
    slow = replicated.slowest
    assert slow.fsdp_s > 0 and "replicated grads" not in slow.by_what


def test_optimizer_state_is_read_per_tensor_from_one_hook(monkeypatch):
    """Memory, the optimizer pass and the dry run take the state's bytes per element from
    `planning.optimizer_state_bytes`: AdamW's 8 B everywhere, and a per-tensor rule (as Muon's
    one momentum buffer for the experts would be) changes exactly the tensors it names."""
    import moetrain.planning as planning

    cfg = config("tiny", "parallel.tp=2", "parallel.ep=2")
    dims = ParallelDims.from_config(cfg.parallel, 4)
    (adam,) = memory_per_rank(cfg, dims)
    n = adam.dense_params + adam.expert_params
    assert adam.optimizer == 8 * n
    est = estimate_step(cfg, dims, hardware("h100"))
    assert est.optimizer_s == pytest.approx(32 * n / 3.35e12)  # 16 B + AdamW's 8 B twice
    with pytest.raises(ValueError, match="optim.name=sgd"):
        planning.optimizer_state_bytes(SimpleNamespace(name="sgd"), SimpleNamespace(name="x"))
    monkeypatch.setattr(planning, "optimizer_state_bytes",
                        lambda optim, spec: 4 if spec.kind == "experts" else 8)
    (muon_like,) = memory_per_rank(cfg, dims)
    assert muon_like.optimizer == 8 * adam.dense_params + 4 * adam.expert_params
    est = estimate_step(cfg, dims, hardware("h100"))
    assert est.optimizer_s == pytest.approx(
        (16 * n + 2 * muon_like.optimizer) / 3.35e12)
    from moetrain.dryrun import dry_run

    run = dry_run(cfg, dims)  # the built tensors, under the same rule, equal the planner
    assert run.ok and run.roles[0].memory["optimizer bytes"] == (muon_like.optimizer,) * 2


def test_hardware_table_and_overrides():
    assert hardware("H100").memory_gib == 80 and hardware("gb200").gpus_per_node == 72
    assert hardware("h200", memory_gib=100, gpus_per_node=4).memory_gib == 100
    for args, flag in [(("a100",), "--gpu"), (("h100", -1), "--gpu-memory"),
                       (("h100", None, 0), "--gpus-per-node")]:
        with pytest.raises(HardwareError) as err:
            hardware(*args)
        assert flag in str(err.value) and "\n" not in str(err.value)


def test_search_returns_fitting_valid_layouts_fastest_first():
    cfg = config("tiny", "train.device=cuda", "data.seq_len=4096")
    gpu = hardware("h100", memory_gib=3.1)  # 0.1 GiB usable: some layouts do not fit
    found, checked = search_layouts(cfg, 8, gpu)
    assert 0 < len(found) < checked
    assert any("train.recompute=moe" in c.overrides for c in found)  # recomputing made it fit
    steps = [c.estimate.step_s for c in found]
    assert steps == sorted(steps)
    for cand in found:
        composed = config("tiny", "train.device=cuda", "data.seq_len=4096", *cand.overrides)
        dims = check_layout(composed, 8)
        assert max(m.total for m in memory_per_rank(composed, dims)) <= (3.1 - RESERVED_GIB) * 2**30


def test_cli_the_qwen3_case_does_not_fit_and_names_layouts_that_do(capsys):
    from moetrain.plan import main

    assert main(["+experiment=qwen3_30b_a3b", "parallel.ep=8", "--world-size", "8",
                 "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "layouts of 8 ranks that fit" in out
    named = [line.split("(")[0].split() for line in out.splitlines()
             if line.startswith("    parallel.")]
    assert len(named) == 3
    for overrides in named:  # each one named does fit
        cfg = config("qwen3_30b_a3b", *overrides)
        peak = max(m.total for m in memory_per_rank(cfg, check_layout(cfg, 8)))
        assert peak <= (80 - RESERVED_GIB) * 2**30
    assert "tokens/s/GPU" in out and "MFU" in out and "(within a node)" in out


@pytest.mark.parametrize("args, flag", [
    (["--gpu", "a100"], "--gpu"),
    (["--gpu", "h100", "--gpu-memory", "0"], "--gpu-memory"),
    (["--gpus-per-node", "8"], "--gpus-per-node needs --gpu"),
    (["--gpu", "h100", "--search"], "--search needs"),
    (["--gpu", "h100", "--world-size", "3", "parallel.tp=2"], "parallel.tp"),
])
def test_cli_bad_hardware_or_layout_is_refused_in_one_line(args, flag, capsys):
    from moetrain.plan import main

    assert main(["+experiment=tiny", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and flag in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: ")


def test_the_step_time_efficiency_is_the_one_calibrated_on_the_published_run():
    """docs/planning.md's table: MATMUL_EFFICIENCY reproduces its calibration row (rounded to
    two digits), so the code, the script and the docs say the same."""
    import importlib.util
    from pathlib import Path

    from moetrain import step_time

    path = Path(__file__).resolve().parents[1] / "scripts" / "plan_vs_published.py"
    spec = importlib.util.spec_from_file_location("plan_vs_published", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules["plan_vs_published"] = script  # its dataclasses look the module up
    spec.loader.exec_module(script)
    (row,) = [r for r in script.ROWS if r.calibrate]
    assert round(script.calibrate(row), 2) == step_time.MATMUL_EFFICIENCY
    predicted = script.predict(row)["tokens_per_s_per_gpu"]
    assert predicted == pytest.approx(row.published, rel=0.02)
