"""Document masking (moetrain/model/documents.py) and the inputs and targets of packed windows
(moetrain/model/inputs.py), each against an independent reference written here: the model run
on every document alone, and the target rules as a plain loop over positions."""

from __future__ import annotations

import pytest
import torch

from moetrain.model import Transformer
from moetrain.model.documents import (
    dense_document_attention, document_mask, document_positions, flex_document_attention,
)
from moetrain.model.inputs import IGNORE_INDEX, InputSpec, model_inputs
from tests.harness import tiny_model_config

EOS = 2


def _window(lengths: list[int], vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Token ids [sum(lengths)]: documents of the given lengths, each ending with EOS (the last
    one may be cut: no EOS)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(lengths):
        doc = torch.randint(3, vocab, (n,), generator=g)
        if i < len(lengths) - 1:
            doc[-1] = EOS
        parts.append(doc)
    return torch.cat(parts)


def test_document_positions_restart_after_every_eos():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 5, 6, 7, 8, 9, 10, 11]])
    assert document_positions(tokens, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1],
                                                        [0, 0, 1, 2, 3, 4, 5, 6]]


def test_document_mask_is_the_block_diagonal_causal_mask():
    tokens = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9]])
    doc = document_positions(tokens, EOS)
    pos = torch.arange(7)
    got = document_mask(pos, pos, doc)[0, 0]
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    want = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])
    assert torch.equal(got, want)


MODELS = {
    "gqa": (),
    "mla": ("model.attention=mla", "model.n_kv_heads=8", "model.mla.q_lora_rank=32",
            "model.mla.kv_lora_rank=32", "model.mla.qk_nope_head_dim=16",
            "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=12"),
}


@pytest.mark.parametrize("kind", MODELS)
def test_a_packed_window_gives_each_document_the_logits_it_has_alone(kind):
    """The reference: every document run through the model on its own (plain causal attention,
    positions from 0), with the same MTP input tokens. The packed window's logits and MTP
    logits of the document's positions must equal them."""
    cfg = tiny_model_config("model.n_layers=2", "model.vocab_size=64", "model.mtp.depth=2",
                            "model.moe.capacity_factor=null", *MODELS[kind])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    lengths = [7, 1, 12, 5, 9]  # a one-token document (just its EOS) too
    window = _window(lengths + [1]).unsqueeze(0)  # + the token after the last input
    spec = InputSpec(mtp_depth=2, eos_id=EOS, document_mask=True)
    packed = model_inputs(window, spec)
    with torch.no_grad():
        outs = model(packed.tokens, None, packed.doc_positions, packed.mtp_tokens)
        start = 0
        for n in lengths:
            # the document alone, its MTP inputs from its own tokens (and what follows it, as
            # in the window: an MTP input may be the next document's first token)
            alone = model_inputs(window[:, start:start + n + 1], InputSpec(mtp_depth=2, eos_id=EOS))
            alone.mtp_tokens = packed.mtp_tokens[:, start:start + n]
            ref = model(alone.tokens, None, None, alone.mtp_tokens)
            for depth in range(3):
                torch.testing.assert_close(outs[depth][:, start:start + n], ref[depth],
                                           rtol=1e-5, atol=1e-5)
            start += n
    # and the mask matters: without it the later documents' logits differ
    with torch.no_grad():
        unmasked = model(packed.tokens)
    assert not torch.allclose(unmasked[:, 8:], outs[0][:, 8:], atol=1e-3)


@pytest.mark.parametrize("kind", MODELS)
def test_rope_positions_restart_at_every_document(kind):
    """Under the document mask RoPE's scores depend on position differences only, so the logits
    cannot show where positions start; the rotated queries and keys can: the first token of
    every document is rotated by 0 (left as projected), like a window's first token."""
    cfg = tiny_model_config("model.n_layers=1", "model.vocab_size=64", *MODELS[kind])
    torch.manual_seed(0)
    attention = Transformer(cfg).layers["0"].attention
    seen = {}

    def record(q, k, v, positions, scale=None, doc_positions=None):
        seen["q"], seen["k"] = q, k
        return torch.zeros(*q.shape[:3], v.shape[-1])

    attention.attention_fn = record
    tokens = _window([4, 6, 5]).unsqueeze(0)
    doc = document_positions(tokens, EOS)
    x = torch.randn(1, tokens.shape[1], cfg.d_model)
    attention(x, torch.arange(tokens.shape[1]), doc_positions=doc)
    rotated = seen["q"], seen["k"]
    attention(x, torch.zeros_like(doc[0]))  # every token rotated by 0
    unrotated = seen["q"], seen["k"]
    starts = (doc[0] == 0).nonzero().flatten().tolist()
    assert starts == [0, 4, 10]
    for got, plain in zip(rotated, unrotated):
        torch.testing.assert_close(got[:, :, starts], plain[:, :, starts])
        assert not torch.allclose(got[:, :, 5], plain[:, :, 5])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_equals_the_masked_sdpa_path():
    """The flex-attention path (fused on CUDA, `flex_available`) against SDPA through the dense
    mask, here through flex attention's eager implementation (forward: torch has no CPU
    backward for it; scripts/gpu_check.py compares forward and backward on a GPU): GQA, a value
    width of its own, two windows with different documents."""
    torch.manual_seed(0)
    B, H, K, S, d, dv = 2, 4, 2, 48, 16, 12
    tokens = torch.stack([_window([10, 20, 18], seed=1), _window([3, 30, 15], seed=2)])
    doc = document_positions(tokens, EOS)
    positions = torch.arange(S)
    q, k, v = (torch.randn(B, h, S, w) for h, w in ((H, d), (K, d), (K, dv)))
    ref = dense_document_attention(q, k, v, positions, doc, scale=0.3)
    got = flex_document_attention(q, k, v, positions, doc, scale=0.3, compiled=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the block mask is built once for the tensors of a forward and again for new ones
    other = document_positions(tokens.flip(0), EOS)
    again = flex_document_attention(q, k, v, positions, other, scale=0.3, compiled=False)
    torch.testing.assert_close(again, dense_document_attention(q, k, v, positions, other,
                                                               scale=0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_flex_attention_equals_the_masked_sdpa_path_on_cuda():
    """The fused path `document_attention` takes on CUDA, forward and backward, fp32."""
    from moetrain.model.documents import document_attention, flex_available

    torch.manual_seed(0)
    B, H, K, S, d, dv = 2, 4, 2, 256, 32, 16
    tokens = torch.stack([_window([40, 100, 116], seed=1), _window([3, 200, 53], seed=2)])
    doc = document_positions(tokens, EOS).cuda()
    positions = torch.arange(S, device="cuda")
    q, k, v = (torch.randn(B, h, S, w, device="cuda", requires_grad=True)
               for h, w in ((H, d), (K, d), (K, dv)))
    assert flex_available(q)
    ref = dense_document_attention(q, k, v, positions, doc, scale=0.2)
    got = document_attention(q, k, v, positions, doc, scale=0.2)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------------ inputs and targets


def _targets_by_rule(window: list[int], depth: int, mask_boundary: bool) -> list[list[int]]:
    """The docstring's rule, position by position: target k + 1 ahead of i is scored iff it is
    in the window, no EOS is among t_i .. t_{i+k-1}, and (mask) t_{i+k} is no EOS."""
    S = len(window) - 1
    rows = []
    for i in range(S):
        row = []
        for k in range(depth + 1):
            ok = i + k + 1 <= S and EOS not in window[i:i + k]
            if mask_boundary and ok and window[i + k] == EOS:
                ok = False
            row.append(window[i + k + 1] if ok else IGNORE_INDEX)
        rows.append(row)
    return rows


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("mask_boundary", [False, True])
def test_targets_follow_the_documented_rule(depth, mask_boundary):
    windows = torch.stack([_window([4, 1, 6, 3, 2], seed=3), _window([2, 9, 5], seed=4)])
    spec = InputSpec(mtp_depth=depth, eos_id=EOS, document_mask=True,
                     mask_boundary=mask_boundary)
    got = model_inputs(windows, spec)
    for b in range(2):
        want = _targets_by_rule(windows[b].tolist(), depth, mask_boundary)
        targets = got.targets[b] if depth else got.targets[b].unsqueeze(-1)
        assert targets.tolist() == want
        if depth:  # inputs: the true token k ahead, 0 past the window
            ids = windows[b].tolist() + [0] * depth
            assert got.mtp_tokens[b].tolist() == [[ids[i + k] for k in range(1, depth + 1)]
                                                  for i in range(windows.shape[1] - 1)]
    assert torch.equal(got.tokens, windows[:, :-1])
    assert torch.equal(got.doc_positions, document_positions(windows[:, :-1], EOS))


def test_inputs_without_an_eos_id_are_refused():
    with pytest.raises(ValueError, match="EOS id"):
        model_inputs(torch.zeros(1, 5, dtype=torch.long), InputSpec(mtp_depth=1))
