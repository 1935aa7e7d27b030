"""The planner: parameter counts against published figures, a hand-computed tiny case, memory
sharding, and the command line."""

import json
import subprocess
import sys

import pytest

from moetrain.config import compose, to_object
from moetrain.parallel.dims import ParallelDims
from moetrain.planning import (
    count_parameters, flops_per_token, granularity, layer_activation_bytes, make_plan,
    memory_per_rank,
)


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
