"""Typed configuration schema: one dataclass per concern, mirrored by the YAML groups in configs/.

Hydra merges the YAML files onto these dataclasses, so a misspelt key, a value of the wrong
type or a value outside a choice list is refused while the config is composed;
`moetrain.config.validate` then checks ranges and the relations between keys before any process
group or model exists. Every choice list lives here, once, as a `Choice` enum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional


class Choice(str, Enum):
    """A config value from a fixed list. A str subclass, so it compares equal to its value
    ("global" == LBLScope("global")) and formats as it."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def _choice(name: str, *values: str) -> type[Choice]:
    # The functional form: some values are not Python names ("global", "1f1b").
    return Choice(name, [(v, v) for v in values])  # type: ignore[return-value]


LBLScope = _choice("LBLScope", "micro", "seq", "global")
ScheduleKind = _choice("ScheduleKind", "constant", "linear", "cosine", "step")
GroupMode = _choice("GroupMode", "none", "limited", "balanced")
ScoreFunc = _choice("ScoreFunc", "softmax", "sigmoid")
PPSchedule = _choice("PPSchedule", "1f1b", "interleaved", "gpipe", "zero_bubble")
CPComm = _choice("CPComm", "allgather", "ring")
LRDecay = _choice("LRDecay", "cosine", "linear", "constant")
Device = _choice("Device", "auto", "cpu", "cuda")
DType = _choice("DType", "auto", "fp32", "bf16")
Recompute = _choice("Recompute", "none", "moe", "full")
WandbMode = _choice("WandbMode", "offline", "online", "disabled")
MoEKernels = _choice("MoEKernels", "auto", "torch", "triton")
OnExhausted = _choice("OnExhausted", "repeat", "stop")
OnBadSteps = _choice("OnBadSteps", "stop", "rollback")
# Which Hugging Face architecture a model config is (moetrain/config/families.py, docs/families.md).
ModelFamily = _choice("ModelFamily", "custom", "mixtral", "qwen3_moe", "olmoe", "deepseek_v2",
                      "deepseek_v3")
AttentionKind = _choice("AttentionKind", "gqa", "mla")
QKNorm = _choice("QKNorm", "none", "head", "full")
RopeScaling = _choice("RopeScaling", "none", "yarn")
# FP8 training recipes and their implementations (moetrain/fp8, docs/fp8.md).
FP8Recipe = _choice("FP8Recipe", "none", "tensorwise", "rowwise", "mxfp8")
FP8Backend = _choice("FP8Backend", "torchao", "te")
GroupScore = _choice("GroupScore", "top2_sum", "max")
OptimName = _choice("OptimName", "adamw", "muon")
NSDType = _choice("NSDType", "bf16", "fp32")
MTPBlock = _choice("MTPBlock", "moe", "dense")
BoundaryLoss = _choice("BoundaryLoss", "keep", "mask")


@dataclass
class LBLConfig:
    # micro: f_i and p_i over the tokens of one micro-batch; seq: per sequence; global: f_i from
    # the counts of every rank and of the step's micro-batches so far (docs/load_balancing.md).
    scope: LBLScope = LBLScope("micro")
    coeff: float = 0.01


@dataclass
class ValueSchedule:
    """A value over optimizer steps (moetrain.model.moe.schedule has the formulas).

    kind: constant | linear | cosine | step. linear/cosine go from `start` at `start_step` to
    `end` at `end_step`; step uses `milestones`, a list of [step, value] pairs (value from that
    step on; `start` before the first). start/end null = the static config value.
    """

    kind: ScheduleKind = ScheduleKind("constant")
    start: Optional[float] = None
    end: Optional[float] = None
    start_step: int = 0
    end_step: int = 0
    # [[step, value], ...]; List[Any] because OmegaConf refuses ints in a List[List[float]].
    milestones: List[Any] = field(default_factory=list)


@dataclass
class SparsitySchedule:
    # top_k is rounded to the nearest integer (halves up) and clamped to [1, num_experts].
    top_k: ValueSchedule = field(default_factory=ValueSchedule)
    capacity_factor: ValueSchedule = field(default_factory=ValueSchedule)


@dataclass
class RoutingConfig:
    """How the router picks experts beyond plain top-k (all off by default)."""

    # Threshold routing ("Harder Tasks Need More Experts"): a token takes experts in score order
    # until their cumulative probability reaches top_p, at least `min_k` and at most model.moe.top_k.
    top_p: Optional[float] = None
    min_k: int = 1
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection
    # only, moved by +-bias_rate each step towards the mean load (0 disables it).
    bias_rate: float = 0.0
    # Group-limited routing over num_groups equal groups of experts: `limited` keeps the
    # topk_groups best groups (DeepSeek node-limited), `balanced` picks top_k / num_groups experts
    # in every group (Pangu MoGE). `none` ignores the groups.
    group_mode: GroupMode = GroupMode("none")
    num_groups: int = 1
    topk_groups: int = 1
    # A group's score under `limited`: the sum of its two best experts (DeepSeek-V3) or its best
    # expert (DeepSeek-V2's group_limited_greedy).
    group_score: GroupScore = GroupScore("top2_sum")
    # Null experts (AdaMoE): zero-compute slots a token may pick instead of a real expert; they
    # count in the load-balancing loss like experts, so their average use is controlled.
    num_null_experts: int = 0


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    # Hidden width of one routed expert (fine-grained experts use a small width and many experts).
    expert_hidden: int = 256
    # The first `first_dense_layers` blocks use a dense SwiGLU MLP instead of an MoE layer.
    first_dense_layers: int = 0
    num_shared_experts: int = 0
    # Width of each shared expert; null means expert_hidden.
    shared_expert_hidden: Optional[int] = None
    score_func: ScoreFunc = ScoreFunc("softmax")
    # Renormalise the selected top-k weights to sum to one.
    norm_topk_prob: bool = True
    # The combine weights (after renormalisation) are multiplied by this (DeepSeek-V2/V3).
    routed_scaling_factor: float = 1.0
    # Gate the shared experts' output per token by sigmoid(x . w_gate) (Qwen2-MoE).
    shared_expert_gate: bool = False
    # Tokens per expert capped at ceil(capacity_factor * tokens * top_k / num_experts);
    # null = dropless.
    capacity_factor: Optional[float] = None
    # With a capacity: pad every expert's buffer to the capacity (static shapes).
    pad_to_capacity: bool = False
    # Token rounding to the grouped-GEMM tile (rows): after capacity, each expert keeps a
    # multiple of the tile (dropping its lowest-score remainder when that is < tile / 2) or all
    # of its tokens; null = off. Policy in moetrain/model/moe/capacity.py.
    token_rounding: Optional[int] = None
    # The permute / combine / SwiGLU implementation (moetrain.kernels): auto = Triton on CUDA
    # where the recorded benchmark shows it faster, else PyTorch; torch; triton.
    kernels: MoEKernels = MoEKernels("auto")
    # Expert parallelism (docs/expert_parallel.md). ep_budget: the sync-free dispatcher - static
    # receive buffers of this factor of the balanced load (rows per EP rank), counts exchanged
    # on the device, no host read per MoE layer; a step that overflows the budget anywhere is
    # redone with a budget that covers it, and the budget adapts. null = exact-size buffers
    # (the split sizes read on the host once per MoE layer and forward).
    ep_budget: Optional[float] = None
    # Overlap the expert all-to-alls with compute: the rows move in two halves (the EP ranks'
    # experts split in two), each half's dispatch / combine in flight while the other half's
    # experts and the shared experts compute, forward and backward.
    ep_overlap: bool = False
    lbl: LBLConfig = field(default_factory=LBLConfig)
    z_loss_coeff: float = 0.0
    # Progressive sparsification: top_k and capacity_factor as functions of the step.
    schedule: SparsitySchedule = field(default_factory=SparsitySchedule)
    routing: RoutingConfig = field(default_factory=RoutingConfig)


@dataclass
class InitConfig:
    # Upcycling (BAM / sparse upcycling): initialise from a dense moetrain checkpoint of the same
    # trunk - attention, norms, embeddings copied; every expert a copy of the dense MLP (or, with
    # granularity m, of one of its m hidden slices, output scaled by m); routers fresh.
    upcycle_from: Optional[str] = None
    upcycle_granularity: int = 1
    # Start from a Hugging Face checkpoint folder of the config's family (model.family): every
    # rank reads only its own slices of the safetensors files; model.* must equal its config
    # (`python -m moetrain.hf overrides DIR` prints them). Not applied when resuming.
    from_hf: Optional[str] = None
    # Starting from a Hugging Face model (from_hf, or a dense one to upcycle), data.tokenizer.path
    # must be that model's tokenizer (by default it is); true allows another vocabulary on purpose.
    allow_other_tokenizer: bool = False


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3), used when model.attention = mla."""

    # Rank of the low-rank query projection; null = a full query projection (DeepSeek-V2-Lite).
    q_lora_rank: Optional[int] = None
    # Rank of the compressed key/value latent.
    kv_lora_rank: int = 512
    # Per-head query/key widths without and with rotary embedding (the rotary key is one head
    # shared by every query head), and the value head width.
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class RopeScalingConfig:
    """RoPE context extension. yarn: YaRN frequencies (Peng et al. 2023) as Hugging Face computes
    them; with multi-head latent attention the softmax scale is multiplied by
    mscale(factor, mscale_all_dim)^2 as in DeepSeek-V2/V3."""

    kind: RopeScaling = RopeScaling("none")
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3, arXiv:2412.19437 section 2.2): `depth` sequential
    modules after the main model, module k predicting the token k + 1 ahead from module k-1's
    hidden state and the embedding of the token k ahead (moetrain/model/mtp.py)."""

    # Prediction depths D (0 = no MTP).
    depth: int = 0
    # lambda: the MTP loss added to the LM loss is lambda / D * sum_k CE_k (DeepSeek-V3: 0.3 for
    # the first 10T tokens, then 0.1).
    loss_scale: float = 0.3
    # lambda as a function of the optimizer step (start / end null = loss_scale).
    loss_scale_schedule: ValueSchedule = field(default_factory=ValueSchedule)
    # The transformer block of each module: moe (an MoE layer of model.moe, DeepSeek-V3) or
    # dense (a SwiGLU MLP of model.ffn_hidden).
    block: MTPBlock = MTPBlock("moe")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    # Per-head width; null means d_model // n_heads.
    head_dim: Optional[int] = None
    # Hidden width of the dense SwiGLU MLP used by the first dense layers.
    ffn_hidden: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # The Hugging Face architecture this config is (export/import, docs/families.md); custom:
    # none, any moetrain feature allowed. A named family refuses features it cannot express.
    family: ModelFamily = ModelFamily("custom")
    # gqa: grouped-query attention (wq/wk/wv/wo); mla: multi-head latent attention (model.mla).
    attention: AttentionKind = AttentionKind("gqa")
    # RMSNorm of queries and keys before RoPE: per head (Qwen3) or over the whole projection
    # (OLMoE); gqa only.
    qk_norm: QKNorm = QKNorm("none")
    mla: MLAConfig = field(default_factory=MLAConfig)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # The longest context the model is declared for (written to an exported config.json).
    max_position_embeddings: int = 4096
    init: InitConfig = field(default_factory=InitConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)


def head_dim_of(model: Any) -> int:
    """Per-head width of a `ModelConfig`: model.head_dim, or d_model // n_heads when null."""
    return model.head_dim or model.d_model // model.n_heads


@dataclass
class FSDPConfig:
    # true: FSDP2 (ZeRO-3 with reshard_after_forward, ZeRO-2 without); false: replicated DP.
    enabled: bool = True
    reshard_after_forward: bool = True


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1
    pp_schedule: PPSchedule = PPSchedule("1f1b")
    # Layers per virtual pipeline stage (pp * vpp entries, summing to model.n_layers; the first
    # and last may be 0: they hold the embedding / the output head); null = an even split.
    pp_layers: Optional[List[int]] = None
    cp_comm: CPComm = CPComm("allgather")
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class SourceConfig:
    """One text source of the training mixture (docs/data.md)."""

    # A file, a folder or a glob of .txt / .jsonl / .jsonl.gz / .jsonl.zst / .parquet / .arrow
    # files, or a folder written by datasets' save_to_disk.
    path: str = ""
    # Relative share of each global batch's sequences (normalised over the sources).
    weight: float = 1.0
    # The column / JSON key holding the document text (ignored for .txt: one file = one document).
    text_field: str = "text"
    # Shown in metrics.jsonl (source_tokens/<name>); null = from the path (file or folder name).
    name: Optional[str] = None


@dataclass
class TokenizerConfig:
    # An existing sentencepiece .model or Hugging Face tokenizer.json (or a folder holding one);
    # null = train a sentencepiece BPE on the sources.
    path: Optional[str] = None
    # Pieces of the BPE trained when path is null; null = model.vocab_size.
    vocab_size: Optional[int] = None
    # The end-of-document token of an existing tokenizer, when the file does not say which it is.
    eos_token: Optional[str] = None


@dataclass
class DataConfig:
    # Shorthand for one source: a text file or a folder of .txt files. With neither corpus nor
    # sources set, the corpus shipped in data/corpus is used.
    corpus: Optional[str] = None
    sources: List[SourceConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Where the tokenizer and the token shards go; null = ~/.cache/moetrain (or $MOETRAIN_CACHE)
    # under a fingerprint of the tokenizer (and, for a trained one, of the sources).
    prepared_dir: Optional[str] = None
    seq_len: int = 128
    # Fraction of each source's token stream held out for validation.
    val_fraction: float = 0.02
    # Prepare (tokenizer, tokens, shards) automatically when the prepared data is missing.
    auto_prepare: bool = True
    # Tokenising processes while preparing; null = every core this process may use.
    num_workers: Optional[int] = None
    # When a source has no sequences left for the next global batch: repeat (a new epoch of
    # that source, a fresh permutation) or stop (cleanly, with a checkpoint and a message).
    on_exhausted: OnExhausted = OnExhausted("repeat")
    # Packed documents: attention stays inside each document of a window (the EOS that ends a
    # document belongs to it) and RoPE positions restart at 0 with each document.
    document_mask: bool = False
    # The loss at a document boundary, where the EOS token predicts the next document's first
    # token: keep it (the only place that first token is learnt) or mask it. Targets of the
    # multi-token prediction that reach past an EOS are always masked (docs/documents.md).
    boundary_loss: BoundaryLoss = BoundaryLoss("keep")


@dataclass
class OptimConfig:
    # adamw: AdamW for every parameter. muon: Muon for the hidden matrices (attention
    # projections, dense MLPs, shared and routed experts - each expert's matrices separately),
    # AdamW for the rest (embeddings, output head, norms, router); docs/optimizers.md.
    name: OptimName = OptimName("adamw")
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: LRDecay = LRDecay("cosine")
    # Clip the global gradient norm to this value; 0 disables clipping.
    grad_clip: float = 1.0
    # Muon (optim.name=muon): Nesterov momentum, Newton-Schulz steps; the update is scaled by
    # 0.2 sqrt(max(rows, cols)) so lr and weight_decay carry over from AdamW.
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    # Precision of Newton-Schulz: bf16 as torch.optim.Muon (fast; its rounding makes runs
    # that differ in the last bit of a gradient differ by ~1% in the update), or fp32.
    ns_dtype: NSDType = NSDType("bf16")
    # MuonClip (Kimi K2): after each step, scale the query/key projections of every attention
    # head whose largest pre-softmax logit of the step exceeded this threshold; null = off.
    qk_clip_threshold: Optional[float] = None


@dataclass
class TrainConfig:
    max_steps: int = 60
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seed: int = 1234
    # Bit-reproducible runs on CPU (deterministic algorithms, fixed thread count).
    deterministic: bool = False
    device: Device = Device("auto")
    # auto: bf16 autocast on GPU, fp32 on CPU.
    dtype: DType = DType("auto")
    log_every: int = 1
    # After this many consecutive steps whose loss or gradient was NaN/inf (such steps are
    # skipped, and no checkpoint is written while the last step was one): stop (exit 2), or
    # rollback = reload the newest good checkpoint and go on past the batches of the streak.
    max_bad_steps: int = 5
    on_bad_steps: OnBadSteps = OnBadSteps("stop")
    # Evaluate on the validation split every `eval_every` steps (0 = never) over `eval_batches`.
    eval_every: int = 0
    eval_batches: int = 4
    # Capacity factor of the MoE layers during evaluation; null = dropless, so the validation
    # loss does not change with the training capacity (model.moe.capacity_factor).
    eval_capacity_factor: Optional[float] = None
    # Wall-clock budget in seconds; null = unlimited.
    max_time: Optional[float] = None
    # Activation recomputation in backward: none | moe (the MoE layers) | full (whole blocks).
    recompute: Recompute = Recompute("none")
    # Compile every transformer block with torch.compile (regional compilation; docs/performance.md).
    compile: bool = False
    # FP8 training (docs/fp8.md): none | tensorwise | rowwise | mxfp8. The linears of attention,
    # dense MLPs and shared experts compute in float8, the routed experts' grouped GEMMs through
    # torchao's MoE training ops; router, norms, embeddings (and the output head, unless
    # fp8_output_head) stay in high precision, and so do the weights and checkpoints. On the CPU
    # every recipe runs emulated (quantize -> dequantize -> high-precision GEMM); on a GPU a
    # recipe its hardware cannot run is refused.
    fp8: FP8Recipe = FP8Recipe("none")
    # torchao | te (Transformer Engine for the dense linears: NVIDIA GPUs where it is installed).
    fp8_backend: FP8Backend = FP8Backend("torchao")
    # The output head as a float8 linear too (off by default: the logits are the most sensitive).
    fp8_output_head: bool = False


@dataclass
class CheckpointConfig:
    # Save every `every` optimizer steps and at the last step (0 = only when a signal or
    # train.max_time stops the run early).
    every: int = 100
    resume: str = "auto"  # auto | never | a checkpoint directory
    # Keep the newest `keep_last` checkpoints (null = keep all); `latest` is never deleted.
    keep_last: Optional[int] = None
    # Write checkpoints in the background while training goes on (`checkpoint.async=true` on the
    # command line is accepted as an alias: `async` is a Python keyword, so not a field name).
    async_save: bool = False


@dataclass
class FaultConfig:
    """Hangs and timeouts (docs/faults.md). Seconds throughout."""
    # Collective timeout while starting, through the first step, and around checkpoint saves,
    # loads and evaluations (torchtitan's init_timeout_seconds).
    init_timeout: float = 600.0
    # Collective timeout for training steps after the first (torchtitan's train_timeout_seconds).
    step_timeout: float = 120.0
    # A watchdog thread per rank: a phase that outlives 90% of its timeout while another rank is
    # behind or silent (slow ranks all in the same phase are not a hang), or a step that waits
    # on a rank whose heartbeat stopped for `heartbeat_timeout`, is a hang: the ranks that did
    # not arrive are named, stacks dumped to the rank logs, and the rank exits with code 75 so
    # the launcher restarts the workers or SLURM requeues the job.
    watchdog: bool = True
    heartbeat_timeout: float = 30.0
    # Log a step that takes this many times the median of the recent steps as slow (no exit).
    slow_step_factor: float = 10.0


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "moetrain"
    mode: WandbMode = WandbMode("offline")
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    # Live progress line on the console (rank 0).
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False


@dataclass
class RunConfig:
    # The run directory shared by every rank; null = outputs/<name>-<timestamp> (chosen on rank 0).
    dir: Optional[str] = None
    name: str = "run"


@dataclass
class MoetrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
