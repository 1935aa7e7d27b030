"""Document-masked attention: the SDPA path through a dense mask against flex attention with a
block mask (moetrain/model/documents.py), timed side by side on packed windows of documents.

    python scripts/bench_documents.py                          (CUDA: compiled flex, fwd + bwd)
    python scripts/bench_documents.py --device cpu --shape 1,4,2,256,64 --doc 50 --iters 2
    python scripts/bench_documents.py --json out.json

--shape B,Hq,Hkv,S,d (value width d too); documents of --doc tokens on average (lengths drawn
from an exponential, so some cross blocks and some are short). On CUDA the flex path is the one
`document_attention` takes (compiled; forward and backward); on the CPU flex attention runs
eagerly, forward only (torch has no CPU backward for it) - a check of the path, not a speed.
Reports the median milliseconds of each, their agreement (max |flex - dense| / max |dense|) and
the fraction of the S x S score blocks the mask lets flex skip. scripts/gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchlib import device_name, median, time_iterations
from moetrain.model.documents import (
    dense_document_attention, document_mask, document_positions, flex_document_attention,
)


def packed_window(B: int, S: int, mean_doc: float, eos: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids [B, S] of documents of exponential lengths (mean `mean_doc`), EOS-terminated."""
    tokens = torch.randint(3, 1000, (B, S), generator=gen)
    for b in range(B):
        i = 0
        while True:
            n = max(1, int(torch.empty(()).exponential_(1 / mean_doc, generator=gen)))
            i += n
            if i >= S:
                break
            tokens[b, i - 1] = eos
    return tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="2,32,8,4096,128", help="B,Hq,Hkv,S,d")
    p.add_argument("--doc", type=float, default=600.0, help="mean document length in tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        B, H, K, S, d = (int(x) for x in args.shape.split(","))
    except ValueError:
        print(f"error: --shape {args.shape!r} must be B,Hq,Hkv,S,d (integers)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    gen = torch.Generator().manual_seed(0)
    tokens = packed_window(B, S, args.doc, 2, gen)
    doc = document_positions(tokens, 2).to(device)
    positions = torch.arange(S, device=device)
    q, k, v = (torch.randn(B, h, S, d, generator=gen).to(device, dtype).requires_grad_(cuda)
               for h in (H, K, K))
    grad = torch.randn(B, H, S, d, generator=gen).to(device, dtype)

    def run(fn):
        def step():
            out = fn()
            if cuda:
                torch.autograd.grad(out, (q, k, v), grad)
            return out
        return step

    dense = run(lambda: dense_document_attention(q, k, v, positions, doc))
    flex = run(lambda: flex_document_attention(q, k, v, positions, doc, compiled=cuda))
    ref, got = dense(), flex()
    agree = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
    dense_ms = median(time_iterations(dense, device, args.iters, args.warmup))
    flex_ms = median(time_iterations(flex, device, args.iters, args.warmup))
    block = 128 if S % 128 == 0 else S  # flex attention's default block size
    mask = document_mask(positions, positions, doc)[:, 0]
    tiles = mask.unflatten(1, (S // block, block)).unflatten(3, (S // block, block)).any(-1).any(2)
    result = {"device": device_name(device), "shape": dict(B=B, Hq=H, Hkv=K, S=S, d=d),
              "dtype": str(dtype).replace("torch.", ""), "mean_doc": args.doc,
              "backward": cuda, "dense_ms": dense_ms, "flex_ms": flex_ms,
              "speedup": dense_ms / flex_ms, "rel_err": agree,
              "blocks_skipped": 1.0 - float(tiles.float().mean())}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
