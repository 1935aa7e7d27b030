"""Decoder-only MoE transformer: pre-norm blocks of attention and a dense or MoE feed-forward,
optionally followed by multi-token-prediction modules (moetrain/model/mtp.py)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from moetrain.config.schema import ModelConfig
from moetrain.model.block import TransformerBlock, blocks, build_attention, set_recompute
from moetrain.model.init import init_parameters
from moetrain.model.mtp import build_mtp
from moetrain.model.norm import RMSNorm


class Transformer(nn.Module):
    """tokens [B, S] (or hidden states [B, S, D] on a later pipeline stage) -> logits [B, S, V],
    or with `mtp_tokens` the tuple (logits, MTP logits of depth 1, ..., depth D).

    `tok_embeddings`, `norm`, `output` and `mtp` may be set to None (pipeline stages), and
    entries of the `layers` ModuleDict (keys "0".."n_layers-1", kept when others are deleted)
    removed. The input is token ids to embed when the module holds `tok_embeddings` and
    `embeds_input` (False on a pipeline stage after the first, which may still hold the
    embedding for its MTP modules or tied output head), else hidden states.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeds_input = True
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.d_model)
        first_moe = cfg.moe.first_dense_layers
        self.layers = nn.ModuleDict({
            str(i): TransformerBlock(cfg, moe_index=None if i < first_moe else i - first_moe)
            for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.mtp: Optional[nn.ModuleDict] = build_mtp(cfg)
        self.init_weights()

    @property
    def takes_hidden(self) -> bool:
        """Whether the input is hidden states [B, S, D] (a pipeline stage after the first)."""
        return not self.embeds_input or self.tok_embeddings is None

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                doc_positions: Optional[torch.Tensor] = None,
                mtp_tokens: Optional[torch.Tensor] = None,
                ) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """positions: [S] or [B, S] integer positions in the window (default 0..S-1);
        doc_positions: [B, S] positions inside each token's document (None: the window is one
        document; moetrain/model/documents.py); mtp_tokens: [B, S, D] int64, [..., k-1] the
        token k ahead of each position (moetrain/model/inputs.py), for the MTP modules - with
        it the result is the tuple (main logits, depth-1 logits, ..., depth-D logits)."""
        h = tokens if self.takes_hidden else self.tok_embeddings(tokens)
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        for layer in self.layers.values():
            h = layer(h, positions, doc_positions)
        if self.output is None:  # a pipeline stage before the last: hand on the hidden state
            return h
        logits = self.output(self.norm(h))
        if self.mtp is None or mtp_tokens is None:
            return logits
        outputs = [logits]
        for k, module in enumerate(self.mtp.values()):
            h, normed = module(h, self.tok_embeddings(mtp_tokens[..., k]), positions,
                               doc_positions)
            outputs.append(self.output(normed))
        return tuple(outputs)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialise the weights this module holds (moetrain/model/init.py has the rules and
        the counter-based generator: values depend only on the seed, the parameter's name and
        the element's global index, so pipeline stages and shards get one process's values).

        seed=None draws the seed from the global torch RNG, so `torch.manual_seed(s);
        Transformer(cfg)` is reproducible. On the meta device there is nothing to initialise
        (the trainer initialises each rank's shards once they are allocated).
        """
        if all(p.is_meta for p in self.parameters()):
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        init_parameters(self, self.cfg, seed)


__all__ = ["Transformer", "TransformerBlock", "blocks", "build_attention", "set_recompute"]
