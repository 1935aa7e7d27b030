"""An independent reference for optimizer steps of the MoE model (tests only).

Written from the formulas in docs/ (load_balancing.md, sparsity_schedules.md, features/*) and the
optimizer rules of moetrain/optim.py's docstrings, in plain PyTorch: its own forward from the
weight tensors (RMSNorm, RoPE, causal GQA attention, SwiGLU, the MoE layer with a per-expert
loop), its own routing, losses, accumulation, clipping, LR schedule, bias update and sparsity
schedules. It imports nothing from moetrain but the config dataclasses it reads, so a bug in
the trainer's bookkeeping (which every layout shares, and the layout equivalence tests
therefore cannot see) shows up as a difference from this reference. torch.optim.AdamW is a
well-kept library: the reference uses it, with its own parameter groups and learning rates.

    ref = Reference(cfg, model.state_dict())      # the weights the trainer starts from
    out = ref.train_step([tokens_of_micro_batch_1, ...])   # token ids [b, S + 1] each
    out.loss, out.aux_loss, out.grads, ...; ref.params, ref.bias, ref.optimizer after the step

Multi-token prediction (docs/mtp.md: DeepSeek-V3's modules, the MTP loss lambda / D * sum_k
CE_k over the window's tokens) and packed documents (docs/documents.md: attention and RoPE
positions inside each document, the targets that cross a document masked) are computed from the
token ids with loops over positions, not from the trainer's masks.

Everything runs in fp32 on the CPU like the trainer's tests; sums that docs/ define in integers
(loads, the bias direction) are integers here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from moetrain.config.schema import MoetrainConfig


# ----------------------------------------------------------------------------- schedules
def lr_at(step: int, optim: Any, max_steps: int) -> float:
    """optim.py: linear warmup to lr over warmup_steps (step s gets lr (s+1)/warmup), then
    cosine or linear decay to lr * min_lr_ratio at max_steps (or constant)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    low = optim.lr * optim.min_lr_ratio
    frac = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    if optim.decay == "linear":
        return optim.lr + (low - optim.lr) * frac
    return low + (optim.lr - low) * (1.0 + math.cos(math.pi * frac)) / 2.0


def scheduled(sched: Any, step: int, static: Optional[float]) -> Optional[float]:
    """docs/sparsity_schedules.md, "Kinds": the value of a schedule at step s."""
    start = static if sched.start is None else sched.start
    end = static if sched.end is None else sched.end
    if sched.kind == "constant":
        return start
    if sched.kind == "step":
        value = start
        for m_step, m_value in sched.milestones:  # validated: strictly increasing steps
            if m_step <= step:
                value = m_value
        return value
    r = min(1.0, max(0.0, (step - sched.start_step) / (sched.end_step - sched.start_step)))
    if r == 0.0 or r == 1.0:  # an endpoint may be null (dropless)
        return start if r == 0.0 else end
    if sched.kind == "cosine":
        r = (1.0 - math.cos(math.pi * r)) / 2.0
    return start + (end - start) * r


def top_k_at(moe: Any, step: int) -> int:
    """Halves rounded up (floor(v + 0.5)), clamped to [1, num_experts]."""
    value = scheduled(moe.schedule.top_k, step, moe.top_k)
    return min(moe.num_experts, max(1, math.floor(value + 0.5)))


def capacity_factor_at(moe: Any, step: int) -> Optional[float]:
    return scheduled(moe.schedule.capacity_factor, step, moe.capacity_factor)


# ----------------------------------------------------------------------------- model pieces
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x_BSHd: torch.Tensor, theta: float, positions_BS: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE at integer positions [B, S]: dimension i pairs with i + d/2."""
    d = x_BSHd.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions_BS.double()[..., None] * inv_freq  # [B, S, d/2]
    cos = angle.cos().float()[:, :, None, :]
    sin = angle.sin().float()[:, :, None, :]
    x1, x2 = x_BSHd[..., : d // 2], x_BSHd[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Window:
    """Where each input token of a micro-batch may look: RoPE positions [B, S] and the visible
    keys [B, S, S] (True = attend)."""

    positions: torch.Tensor
    visible: torch.Tensor


def window_of(tokens_BS: torch.Tensor, eos_id: Optional[int], per_document: bool) -> Window:
    """Without document masking: positions 0..S-1, causal. With it (docs/documents.md): a
    document ends with its EOS; a token sees the tokens of its document up to itself and is
    at its index inside the document."""
    B, S = tokens_BS.shape
    positions = torch.zeros(B, S, dtype=torch.long)
    visible = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        start = 0
        for i in range(S):
            if per_document and i > 0 and int(tokens_BS[b, i - 1]) == eos_id:
                start = i
            first = start if per_document else 0
            positions[b, i] = i - first
            visible[b, i, first:i + 1] = True
    return Window(positions, visible)


def attention(x_BSD: torch.Tensor, w: dict[str, torch.Tensor], head_dim: int,
              theta: float, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention over the visible keys; query head h reads key/value head
    h // (heads / kv heads). Returns the output and each head's largest logit over the batch
    and the logits the softmax uses [H] (MuonClip)."""
    B, S, _ = x_BSD.shape
    q = rope((x_BSD @ w["wq"].T).view(B, S, -1, head_dim), theta, window.positions)
    k = rope((x_BSD @ w["wk"].T).view(B, S, -1, head_dim), theta, window.positions)
    v = (x_BSD @ w["wv"].T).view(B, S, -1, head_dim)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(head_dim)
    masked = scores.masked_fill(~window.visible[:, None], float("-inf"))
    probs = masked.softmax(-1)
    out = torch.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, -1)
    return out @ w["wo"].T, masked.detach().amax(dim=(0, 2, 3))


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w1, w3 [D, F], w2 [F, D] (the experts' layout; a Linear's weight is the transpose)."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


@dataclass
class MoEForward:
    """One MoE layer's forward on one micro-batch: its output and what the losses and the
    statistics need."""

    y: torch.Tensor  # [B, S, D]
    lbl: torch.Tensor  # scalar, with the gradient through p only
    z: torch.Tensor  # scalar
    slot_counts: torch.Tensor  # [N] int64: taken assignments per slot, before dropping
    prob_sum: torch.Tensor  # [N] summed routing distribution (detached)
    active: int  # assignments to real experts that need compute (before dropping)
    kept: int  # of those, the ones computed (after capacity and token rounding)
    tokens: int
    taken_per_token: list[int]  # [T] assignments each token took (below top_k only with top-p)


Assignment = tuple[float, int, int]  # (score, token t, position j)


def _keep_highest(assignments: list[Assignment], n: int) -> list[Assignment]:
    """The n highest-score (score, t, j) assignments; ties: the earlier token is kept."""
    return sorted(assignments, key=lambda a: (-a[0], a[1]))[:n]


def moe_forward(x_BSD: torch.Tensor, w: dict[str, torch.Tensor], bias: torch.Tensor, moe: Any,
                top_k: int, capacity_factor: Optional[float],
                running_counts: Optional[torch.Tensor], biased_weights: bool = False) -> MoEForward:
    """docs/load_balancing.md: routing, capacity, token rounding, experts, LBL and z-loss.

    `running_counts` [N]: the global scope's counts of the step so far (updated in place).
    `biased_weights`: take the combine weights from scores + bias - a known bug, for the tests
    that show they can see it."""
    B, S, D = x_BSD.shape
    T, E, K = B * S, moe.num_experts, top_k
    r = moe.routing
    x = x_BSD.reshape(T, D)
    logits = x @ w["router"].T  # [T, N]
    N = logits.shape[1]
    scores = logits.softmax(-1) if moe.score_func == "softmax" else logits.sigmoid()
    # Selection: scores + bias (aux-loss-free balancing); the weights use the scores alone.
    select = scores.detach() + (bias if r.bias_rate > 0 else 0.0)
    idx = select.topk(K, dim=-1).indices  # [T, K], by descending selection score
    chosen = (scores + bias if biased_weights else scores).gather(1, idx)
    # Top-p: assignment j is taken while the probabilities before it sum to < top_p.
    taken = torch.ones(T, K, dtype=torch.bool)
    if r.top_p is not None:
        prob = chosen.detach()
        if moe.score_func == "sigmoid":
            prob = prob / scores.detach().sum(-1, keepdim=True)
        before = prob.cumsum(-1) - prob
        taken = (before < r.top_p) | (torch.arange(K) < r.min_k)
    weight = chosen
    if moe.norm_topk_prob:
        weight = chosen / (chosen * taken).sum(-1, keepdim=True)
    active = taken & (idx < E)  # null experts compute nothing

    keep = active.clone()
    priority = scores.detach()  # capacity and rounding keep the highest (unbiased) scores
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * T * K / E)
        for e in range(E):
            mine = [(float(priority[t, e]), t, j)
                    for t, j in (active & (idx == e)).nonzero().tolist()]
            survivors = {(t, j) for _, t, j in _keep_highest(mine, capacity)}
            for _, t, j in mine:
                keep[t, j] = (t, j) in survivors
    if moe.token_rounding is not None:
        tile = moe.token_rounding
        for e in range(E):
            mine = [(float(priority[t, e]), t, j)
                    for t, j in (keep & (idx == e)).nonzero().tolist()]
            rest = len(mine) % tile
            if 2 * rest < tile:
                survivors = {(t, j) for _, t, j in _keep_highest(mine, len(mine) - rest)}
                for _, t, j in mine:
                    keep[t, j] = (t, j) in survivors

    y = torch.zeros(T, D)
    for e in range(E):
        rows, cols = (keep & (idx == e)).nonzero(as_tuple=True)
        if len(rows):
            out = swiglu(x[rows], w["w1"][e], w["w3"][e], w["w2"][e])
            y = y.index_add(0, rows, out * weight[rows, cols].unsqueeze(-1))
    if "shared_w1" in w:
        y = y + swiglu(x, w["shared_w1"].T, w["shared_w3"].T, w["shared_w2"].T)

    # Load-balancing loss N * sum_i f_i p_i: f from taken assignments (no gradient), p the mean
    # routing distribution (sigmoid scores normalised to sum to one).
    probs = scores if moe.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    onehot = F.one_hot(idx, N) * taken.unsqueeze(-1)  # [T, K, N]
    counts_TN = onehot.sum(1)
    slot_counts = counts_TN.sum(0)
    scope = moe.lbl.scope
    if scope == "seq":
        counts_BN = counts_TN.view(B, S, N).sum(1)
        f = counts_BN / counts_BN.sum(-1, keepdim=True)
        lbl = N * (f * probs.view(B, S, N).mean(1)).sum(-1).mean()
    else:
        counts = slot_counts
        if scope == "global":
            running_counts += slot_counts
            counts = running_counts
        f = counts / counts.sum()
        lbl = N * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return MoEForward(y.view(B, S, D), lbl, z, slot_counts, probs.detach().sum(0),
                      int(active.sum()), int(keep.sum()), T, taken.sum(-1).tolist())


def _hidden_matrix(name: str) -> bool:
    """A hidden matrix for Muon (docs/optimizers.md): attention projections, dense MLPs,
    shared and routed experts (of the layers and the MTP modules' blocks), the MTP modules'
    projections; not embeddings, output head, norms, router."""
    return any(part in name for part in (".attention.w", ".mlp.w", ".shared_experts.w",
                                         ".moe.experts.w", ".eh_proj."))


# ----------------------------------------------------------------------------- the step
IGNORED = -1  # a target the loss does not score


def targets_of(batch_BL: torch.Tensor, ahead: int, eos_id: Optional[int],
               mask_boundary: bool) -> torch.Tensor:
    """The targets `ahead` tokens after each input position i (1 = the next token), IGNORED
    where not scored (docs/mtp.md, docs/documents.md): past the window; when the chain
    t_i .. t_{i+ahead-1} that predicts it holds an EOS anywhere but at its end; and, with
    data.boundary_loss=mask, when its last token t_{i+ahead-1} is an EOS."""
    B, L = batch_BL.shape
    S = L - 1
    out = torch.full((B, S), IGNORED, dtype=torch.long)
    for b in range(B):
        row = batch_BL[b].tolist()
        for i in range(S):
            j = i + ahead
            if j > S:
                continue
            chain = row[i:j]
            if eos_id in chain[:-1] or (mask_boundary and chain[-1] == eos_id):
                continue
            out[b, i] = row[j]
    return out


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the scored targets, and their number."""
    logp = logits.log_softmax(-1)
    scored = targets != IGNORED
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * scored).sum(), int(scored.sum())


@dataclass
class StepOutput:
    """What one optimizer step gives: the logged values and the gradients AdamW received."""

    loss: float  # LM cross-entropy, mean over the global batch's scored targets
    aux_loss: float  # lbl.coeff * LBL summed over MoE layers (docs: "What is logged")
    z_loss: float  # z_loss_coeff * z summed over MoE layers, mean over micro-batches
    grad_norm: float  # global L2 norm before clipping
    lr: float
    top_k: int
    tokens_per_expert: list[list[int]]  # per MoE layer, real experts, summed over the step
    dropped_frac: float
    experts_per_token: float
    taken_per_token: list[int]  # over the step's tokens and MoE layers
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # after clipping
    loads: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, real experts
    max_attn_logit: float = 0.0  # the largest attention logit of the step (before QK-clip)
    mtp_losses: list[float] = field(default_factory=list)  # per depth, mean over scored targets
    mtp_scale: float = 0.0  # lambda of the step
    boundaries: int = 0  # EOS tokens among the step's inputs (documents ending inside a window)


class Reference:
    """The model's weights (copied), AdamW, the expert biases and the step counter.

    MoE layers are named by their module prefix ("layers.3.", "mtp.0.block."), in the model's
    order (the main model's, then the MTP modules'). `eos_id`: the data's end-of-document token
    (document masking and the MTP target rules need it).

    Subclasses may override `step_counts` and `aux_scale` or set `biased_weights` to build the
    known bugs back in (tests/oracle/test_known_bugs.py shows the lockstep comparison sees them).
    """

    biased_weights = False

    def __init__(self, cfg: MoetrainConfig, state_dict: dict[str, torch.Tensor],
                 eos_id: Optional[int] = None) -> None:
        self.cfg, self.eos_id = cfg, eos_id
        m, moe = cfg.model, cfg.model.moe
        if moe.routing.group_mode != "none" and moe.routing.num_groups > 1:
            raise NotImplementedError("model.moe.routing.group_mode: not in the reference")
        self.depth = m.mtp.depth
        self.moe_layers = [f"layers.{i}." for i in range(moe.first_dense_layers, m.n_layers)]
        if m.mtp.block == "moe":
            self.moe_layers += [f"mtp.{k}.block." for k in range(self.depth)]
        expected = self._parameter_names()
        biases = {f"{p}moe.router.expert_bias" for p in self.moe_layers}
        tied = {"output.weight"} if m.tie_embeddings else set()
        unknown = set(state_dict) - expected - biases - tied
        missing = (expected | biases) - set(state_dict)
        assert not unknown and not missing, f"state dict: unknown {unknown}, missing {missing}"
        self.params = {n: state_dict[n].detach().clone().float().requires_grad_(True)
                       for n in sorted(expected)}
        self.bias = {p: state_dict[f"{p}moe.router.expert_bias"].detach().clone().float()
                     for p in self.moe_layers}
        o = cfg.optim
        # optim.name=muon: torch.optim.Muon on every hidden matrix - attention, dense MLP and
        # shared-expert projections whole, each expert's matrix of an [E, m, n] stack on its
        # own (views into the stack, so the forward sees the update) - and AdamW for the rest.
        self.muon_views: dict[str, list[torch.Tensor]] = {}
        if o.name == "muon":
            self.muon_views = {n: ([p.detach()[e] for e in range(p.shape[0])] if p.ndim == 3
                                   else [p.detach()])
                               for n, p in self.params.items() if _hidden_matrix(n)}
            self.muon = torch.optim.Muon(
                [v for views in self.muon_views.values() for v in views], lr=o.lr,
                weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov,
                ns_steps=o.ns_steps, adjust_lr_fn="match_rms_adamw")
        rest = {n: p for n, p in self.params.items() if n not in self.muon_views}
        # Decoupled weight decay on matrices only: 1-D tensors (norm gains) are not decayed.
        decay = [p for n, p in rest.items() if p.ndim >= 2]
        no_decay = [p for n, p in rest.items() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
        self.head_max: dict[str, torch.Tensor] = {}  # the step's largest logit per block, head
        self.step = 0

    def _block_names(self, p: str, dense: bool) -> set[str]:
        m = self.cfg.model
        names = {p + "attention_norm.weight", p + "ffn_norm.weight"}
        names |= {f"{p}attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        if dense:
            return names | {f"{p}mlp.{w}.weight" for w in ("w1", "w2", "w3")}
        names |= {p + "moe.router.weight"} | {f"{p}moe.experts.{w}" for w in ("w1", "w2", "w3")}
        if m.moe.num_shared_experts > 0:
            names |= {f"{p}moe.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")}
        return names

    def _parameter_names(self) -> set[str]:
        m, moe = self.cfg.model, self.cfg.model.moe
        names = {"tok_embeddings.weight", "norm.weight"}
        if not m.tie_embeddings:
            names.add("output.weight")
        for i in range(m.n_layers):
            names |= self._block_names(f"layers.{i}.", i < moe.first_dense_layers)
        for k in range(self.depth):
            p = f"mtp.{k}."
            names |= {p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight",
                      p + "norm.weight"}
            names |= self._block_names(p + "block.", m.mtp.block == "dense")
        return names

    def block(self, h: torch.Tensor, p: str, window: Window, top_k: int,
              capacity_factor: Optional[float], running: dict[str, torch.Tensor],
              moe_outs: list) -> torch.Tensor:
        """One pre-norm block: attention, then the dense MLP or the MoE layer (named `p`)."""
        m, P = self.cfg.model, self.params
        head_dim = m.head_dim or m.d_model // m.n_heads
        attn = {w: P[f"{p}attention.{w}.weight"] for w in ("wq", "wk", "wv", "wo")}
        out, head_max = attention(rms_norm(h, P[p + "attention_norm.weight"], m.norm_eps), attn,
                                  head_dim, m.rope_theta, window)
        h = h + out
        self.head_max[p] = torch.maximum(self.head_max.get(p, head_max), head_max)
        x = rms_norm(h, P[p + "ffn_norm.weight"], m.norm_eps)
        if p not in self.moe_layers:
            return h + swiglu(x, *(P[f"{p}mlp.{w}.weight"].T for w in ("w1", "w3", "w2")))
        w = {"router": P[p + "moe.router.weight"],
             **{n: P[f"{p}moe.experts.{n}"] for n in ("w1", "w2", "w3")}}
        if m.moe.num_shared_experts > 0:
            w.update({f"shared_{n}": P[f"{p}moe.shared_experts.{n}.weight"]
                      for n in ("w1", "w2", "w3")})
        out = moe_forward(x, w, self.bias[p], m.moe, top_k, capacity_factor, running.get(p),
                          self.biased_weights)
        moe_outs.append(out)
        return h + out.y

    def forward(self, batch_BL: torch.Tensor, top_k: int, capacity_factor: Optional[float],
                running: dict[str, torch.Tensor],
                ) -> tuple[list[torch.Tensor], list[MoEForward]]:
        """Logits of a micro-batch's inputs (token ids [B, S + 1]): the next token's, then each
        MTP depth's (DeepSeek-V3: h^k = Block_k(M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1})]),
        logits = OutHead(RMSNorm_k(h^k)), h^0 the main model's last hidden state)."""
        m, P = self.cfg.model, self.params
        tokens = batch_BL[:, :-1]
        window = window_of(tokens, self.eos_id, self.cfg.data.document_mask)
        h = P["tok_embeddings.weight"][tokens]
        moe_outs: list[MoEForward] = []
        for i in range(m.n_layers):
            h = self.block(h, f"layers.{i}.", window, top_k, capacity_factor, running, moe_outs)
        out_w = P["tok_embeddings.weight"] if m.tie_embeddings else P["output.weight"]
        logits = [rms_norm(h, P["norm.weight"], m.norm_eps) @ out_w.T]
        S = tokens.shape[1]
        padded = torch.cat([batch_BL, torch.zeros_like(batch_BL[:, :self.depth])], dim=1)
        for k in range(1, self.depth + 1):
            p = f"mtp.{k - 1}."
            emb = P["tok_embeddings.weight"][padded[:, k:k + S]]  # t_{i+k}
            x = torch.cat([rms_norm(emb, P[p + "enorm.weight"], m.norm_eps),
                           rms_norm(h, P[p + "hnorm.weight"], m.norm_eps)], dim=-1)
            h = self.block(x @ P[p + "eh_proj.weight"].T, p + "block.", window, top_k,
                           capacity_factor, running, moe_outs)
            logits.append(rms_norm(h, P[p + "norm.weight"], m.norm_eps) @ out_w.T)
        return logits, moe_outs

    def step_counts(self) -> dict[str, torch.Tensor]:
        """The global scope's running counts per MoE layer: from zero at every step."""
        slots = self.cfg.model.moe.num_experts + self.cfg.model.moe.routing.num_null_experts
        return {p: torch.zeros(slots, dtype=torch.int64) for p in self.moe_layers}

    def aux_scale(self, micro_batches: int) -> float:
        """Each micro-batch's aux losses count 1 / micro-batches (their mean over the step)."""
        return 1.0 / micro_batches

    def train_step(self, micro_batches: list[torch.Tensor],
                   grads: Optional[dict[str, torch.Tensor]] = None) -> StepOutput:
        """One optimizer step over the global batch given as micro-batches of token ids
        [b, S + 1]: the gradient of (LM sum over the scored targets + lambda / D * each MTP
        depth's sum, over all tokens of the global batch + the mean over micro-batches of each
        MoE layer's lbl.coeff * LBL + z_loss_coeff * z), clipped, then the optimizer at this
        step's LR, QK-clip, the bias update. `grads`: step the optimizer with these (clipped)
        gradients instead of its own (see `update`)."""
        out = self.gradients(micro_batches)
        self.update(out, grads)
        return out

    def gradients(self, micro_batches: list[torch.Tensor]) -> StepOutput:
        """The step's forward, backward and clipping (the parameters' .grad) and logged values;
        `update` takes the step."""
        cfg, moe = self.cfg, self.cfg.model.moe
        M = len(micro_batches)
        tokens = sum(b[:, 1:].numel() for b in micro_batches)
        top_k = top_k_at(moe, self.step)
        capacity_factor = capacity_factor_at(moe, self.step)
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        mtp_scale = scheduled(cfg.model.mtp.loss_scale_schedule, self.step,
                              cfg.model.mtp.loss_scale)
        mask_boundary = cfg.data.boundary_loss == "mask"
        for p in self.params.values():
            p.grad = None
        self.head_max = {}
        running = self.step_counts() if moe.lbl.scope == "global" else {}
        sums = [0.0] * (1 + self.depth)
        counts = [0] * (1 + self.depth)
        per_layer: list[list[MoEForward]] = [[] for _ in self.moe_layers]
        for batch in micro_batches:
            logits, outs = self.forward(batch, top_k, capacity_factor, running)
            loss = 0.0
            for k, lg in enumerate(logits):
                total, n = ce_sum(lg, targets_of(batch, k + 1, self.eos_id, mask_boundary))
                loss = loss + (total if k == 0 else mtp_scale / self.depth * total)
                sums[k] += float(total.detach())
                counts[k] += n
            aux = sum(moe.lbl.coeff * o.lbl + moe.z_loss_coeff * o.z for o in outs)
            (loss / tokens + self.aux_scale(M) * aux).backward()
            for layer, o in zip(per_layer, outs):
                layer.append(o)

        grads = {n: p.grad for n, p in self.params.items()}
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
        if cfg.optim.grad_clip > 0:
            coef = min(1.0, cfg.optim.grad_clip / (norm + 1e-6))
            for g in grads.values():
                g.mul_(coef)
        loads = [sum(o.slot_counts for o in layer)[: moe.num_experts] for layer in per_layer]

        if moe.lbl.scope == "global":  # the whole step's LBL: all its counts and tokens
            lbl = 0.0
            for layer in per_layer:
                counts_E = sum(o.slot_counts for o in layer).double()
                prob = sum(o.prob_sum for o in layer).double() / sum(o.tokens for o in layer)
                lbl += len(counts_E) * float((counts_E / counts_E.sum() * prob).sum())
        else:
            lbl = sum(float(o.lbl.detach()) for layer in per_layer for o in layer) / M
        active = [sum(o.active for o in layer) for layer in per_layer]
        kept = [sum(o.kept for o in layer) for layer in per_layer]
        layer_tokens = [sum(o.tokens for o in layer) for layer in per_layer]
        return StepOutput(
            loss=sums[0] / counts[0],
            aux_loss=moe.lbl.coeff * lbl,
            z_loss=moe.z_loss_coeff * sum(float(o.z.detach()) for layer in per_layer
                                          for o in layer) / M,
            grad_norm=norm, lr=lr, top_k=top_k,
            tokens_per_expert=[[int(c) for c in load] for load in loads],
            dropped_frac=(sum(active) - sum(kept)) / max(1, sum(active)),
            experts_per_token=sum(a / t for a, t in zip(active, layer_tokens)) / len(active),
            taken_per_token=[n for layer in per_layer for o in layer for n in o.taken_per_token],
            grads={n: g.detach().clone() for n, g in grads.items()},
            loads=loads,
            max_attn_logit=max(float(m.max()) for m in self.head_max.values()),
            mtp_losses=[sums[k] / counts[k] for k in range(1, 1 + self.depth)],
            mtp_scale=mtp_scale,
            boundaries=sum(int((b[:, :-1] == self.eos_id).sum()) for b in micro_batches),
        )

    def update(self, out: StepOutput, grads: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The optimizer step at this step's LR (with `grads` in place of the parameters' own
        where given: Muon's bf16 Newton-Schulz turns a last-bit difference of a gradient into
        ~1% of its update, so the lockstep compares the update of the SAME gradient and the
        gradients on their own), QK-clip, the bias update; the step counter moves on."""
        cfg, moe = self.cfg, self.cfg.model.moe
        if grads is not None:
            for n, p in self.params.items():
                p.grad = grads[n].clone()
        for opt in (self.optimizer, *([self.muon] if self.muon_views else [])):
            for group in opt.param_groups:
                group["lr"] = out.lr
        for n, views in self.muon_views.items():  # each matrix's slice of the gradient
            g = self.params[n].grad
            for e, v in enumerate(views):
                v.grad = g[e] if g.ndim == 3 else g
        self.optimizer.step()
        if self.muon_views:
            self.muon.step()
        if cfg.optim.qk_clip_threshold is not None:
            self.qk_clip(cfg.optim.qk_clip_threshold)
        if moe.routing.bias_rate > 0:
            E = moe.num_experts
            for p, load in zip(self.moe_layers, out.loads):
                direction = torch.sign(load.sum() - E * load)  # sign(mean - load_i), in integers
                self.bias[p][:E] += moe.routing.bias_rate * direction.float()
        self.step += 1

    @torch.no_grad()
    def qk_clip(self, threshold: float) -> None:
        """docs/optimizers.md, "QK-clip": head h whose largest logit of the step m_h exceeds
        the threshold t gets eta_h = t / m_h (others 1); the kv head shared by a group of query
        heads scales by sqrt(eta_g), eta_g the group's smallest eta, and query head h by
        eta_h / sqrt(eta_g), so every logit of head h scales by eta_h."""
        m = self.cfg.model
        d = m.head_dim or m.d_model // m.n_heads
        group = m.n_heads // m.n_kv_heads
        for p, head_max in self.head_max.items():  # every block's, the MTP modules' too
            wq, wk = (self.params[f"{p}attention.{w}.weight"] for w in ("wq", "wk"))
            eta = [threshold / float(x) if float(x) > threshold else 1.0 for x in head_max]
            for g in range(m.n_kv_heads):
                eta_g = min(eta[g * group:(g + 1) * group])
                wk[g * d:(g + 1) * d] *= math.sqrt(eta_g)
                for h in range(g * group, (g + 1) * group):
                    wq[h * d:(h + 1) * d] *= eta[h] / math.sqrt(eta_g)
