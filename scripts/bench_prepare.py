"""Benchmark data preparation: tokens/s and peak memory for 1, 2, ... tokenising workers.

Generates a jsonl corpus of --size-mb from text on this machine (the shipped corpus, the Python
standard library and installed packages' sources, /usr/share/doc), trains a sentencepiece BPE
(or a `tokenizers` byte-level BPE) of --vocab-size on a sample of it once, then prepares the
corpus with that existing tokenizer for each --workers count, each run in a fresh process:

    python scripts/bench_prepare.py --size-mb 200 --workers 1 2
    python scripts/bench_prepare.py --size-mb 1000 --workers 2 --tokenizer tokenizers
    python scripts/bench_prepare.py --size-mb 200 --workers 1 2 --datasets-map   # the alternative

Peak memory is the largest sum over the preparing process and its workers, sampled every 0.2 s:
PSS (shared pages split between the processes that map them) and RSS (shared pages counted in
every process); CPU s is their user + system time (cpu_main_s in --json: the reading process'
share). On a machine other jobs load, the scheduler shares the cores by process, so compare
CPU s too. Results: docs/data.md. Nothing is written outside --work (default /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 64 << 20
DOC_CHARS = 50_000  # longer files are cut into documents of about this size


def _texts():
    """(name, text) of every readable text file, in a fixed order, forever (with a pass number)."""
    roots = [ROOT / "data" / "corpus", Path(sysconfig.get_paths()["stdlib"]),
             Path(sysconfig.get_paths()["purelib"]), Path("/usr/share/doc")]
    files = []
    for root in roots:
        if root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".py", ".md", ".rst", "")
                            and p.stat().st_size > 200)
    for n in range(1000):
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for i in range(0, len(text), DOC_CHARS):
                # A pass number in each copy, so that repeated text is not byte-identical.
                yield f"{f.name} (pass {n})", text[i : i + DOC_CHARS]


def make_corpus(out: Path, size_mb: int) -> Path:
    """jsonl shards of about SHARD_BYTES, `size_mb` MB in all (reused when already there)."""
    done = out / "DONE"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    total, shard, fh = 0, 0, None
    for name, text in _texts():
        if fh is None or fh.tell() >= SHARD_BYTES:
            if fh:
                fh.close()
            fh = open(out / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
            shard += 1
        line = json.dumps({"text": f"# {name}\n{text}", "source": name}) + "\n"
        fh.write(line)
        total += len(line.encode())
        if total >= size_mb * 1_000_000:
            break
    fh.close()
    done.write_text(f"{total}\n")
    return out


def make_tokenizer(corpus: Path, out: Path, kind: str, vocab_size: int, sample_mb: int) -> Path:
    """Train the 'existing' tokenizer once, on the first `sample_mb` MB of the corpus."""
    target = out / (f"spm{vocab_size}.model" if kind == "sentencepiece" else f"bpe{vocab_size}.json")
    if target.exists():
        return target

    def sample():
        n = 0
        for f in sorted(corpus.glob("*.jsonl")):
            for line in open(f, encoding="utf-8"):
                text = json.loads(line)["text"]
                n += len(text)
                yield text
                if n >= sample_mb * 1_000_000:
                    return

    t0 = time.perf_counter()
    if kind == "sentencepiece":
        from moetrain.data.tokenizer import Tokenizer

        Tokenizer.train((ln for t in sample() for ln in t.split("\n")), target, vocab_size)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(sample(), trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(str(target))
    print(f"trained {target.name} on {sample_mb} MB in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


_CHILD = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from moetrain.config.schema import DataConfig, SourceConfig, TokenizerConfig
from moetrain.data import prepare_data
corpus, tokenizer, out, workers, vocab = sys.argv[1:6]
cfg = DataConfig(sources=[SourceConfig(path=corpus, name="bench")], prepared_dir=out,
                 tokenizer=TokenizerConfig(path=tokenizer), num_workers=int(workers))
t0 = time.perf_counter()
prepare_data(cfg, int(vocab), overwrite=True)
print("SECONDS", time.perf_counter() - t0)
"""

# The alternative measured for comparison (--datasets-map): datasets' own parallelism, which
# needs the corpus converted to an Arrow cache first (load_dataset without streaming), then
# Dataset.map with num_proc writing the token ids to another cache.
_CHILD_MAP = """
import os, sys, time
os.environ["HF_DATASETS_OFFLINE"] = "1"
import datasets, numpy as np
from moetrain.data.tokenizer import Tokenizer
corpus, tokenizer, out, workers, vocab = sys.argv[1:6]
datasets.disable_progress_bars()
t0 = time.perf_counter()
files = sorted(str(p) for p in __import__("pathlib").Path(corpus).glob("*.jsonl"))
ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=out, num_proc=int(workers))
tok = Tokenizer.load(tokenizer)

def encode(batch):
    ids = tok.encode_batch(batch["text"])
    return {"ids": ids, "n": [len(x) + 1 for x in ids]}

ds = ds.map(encode, batched=True, batch_size=256, num_proc=int(workers), remove_columns=ds.column_names)
tokens = sum(ds["n"])
with open(os.path.join(out, "stream.bin"), "wb") as fh:
    for batch in ds.iter(batch_size=1024):
        for ids in batch["ids"]:
            fh.write(np.asarray(ids + [tok.eos_id], dtype=np.uint16).tobytes())
print("SECONDS", time.perf_counter() - t0)
print("TOKENS", tokens)
"""


def _tree_sample(proc: psutil.Process, cpu: dict[int, float]) -> tuple[int, int]:
    """(PSS, RSS) summed over `proc` and its descendants; records each one's CPU seconds in `cpu`."""
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            times = p.cpu_times()
            pss, rss = pss + info.pss, rss + info.rss
            cpu[p.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def run_once(corpus: Path, tokenizer: Path, out: Path, workers: int, vocab: int, child: str = _CHILD) -> dict:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", child, str(corpus), str(tokenizer), str(out), str(workers),
                             str(vocab)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, samples = [0, 0], [0]
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample():
        ps = psutil.Process(proc.pid)
        while not stop.is_set() and proc.poll() is None:
            try:
                pss, rss = _tree_sample(ps, cpu)
            except psutil.Error:  # a process came or went during the scan: sample again
                continue
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            samples[0] += 1
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"preparation failed:\n{output}")
    if child == _CHILD:
        tokens = json.loads((out / "index.json").read_text())["sources"]["bench"]["tokens"]
    else:
        tokens = int(next(ln.split()[1] for ln in output.splitlines() if ln.startswith("TOKENS")))
    seconds = float(next(ln.split()[1] for ln in output.splitlines() if ln.startswith("SECONDS")))
    return {"workers": workers, "tokens": tokens, "seconds": round(seconds, 2), "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / seconds), "cpu_s": round(sum(cpu.values()), 1),
            "cpu_main_s": round(cpu.get(proc.pid, 0.0), 1),
            "peak_pss_mib": round(peak[0] / 2**20),
            "peak_rss_mib": round(peak[1] / 2**20), "memory_samples": samples[0], "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", choices=["sentencepiece", "tokenizers"], default="sentencepiece")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--sample-mb", type=int, default=10, help="text the tokenizer is trained on")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moetrain_bench_prepare"))
    ap.add_argument("--json", type=Path, help="append the results here (one JSON object per line)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared directories")
    ap.add_argument("--datasets-map", action="store_true",
                    help="measure datasets' load_dataset + Dataset.map(num_proc=workers) instead")
    args = ap.parse_args(argv)

    corpus = make_corpus(args.work / f"corpus-{args.size_mb}mb", args.size_mb)
    size = int((corpus / "DONE").read_text())
    # The corpora all start with the same text: every size gets the same tokenizer.
    tokenizer = make_tokenizer(corpus, args.work, args.tokenizer, args.vocab_size, args.sample_mb)
    print(f"corpus: {size / 1e6:.0f} MB of jsonl in {corpus}; tokenizer {tokenizer.name}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    print("| corpus | tokenizer | workers | tokens | seconds | tokens/s | speed-up | CPU s | tokens/CPU-s | "
          "peak PSS MiB | peak RSS MiB | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for w in args.workers:
        out = args.work / f"prepared-{args.size_mb}mb-{w}w{'-map' if args.datasets_map else ''}"
        r = run_once(corpus, tokenizer, out, w, args.vocab_size, _CHILD_MAP if args.datasets_map else _CHILD)
        base = base or r["tokens_per_s"]
        method = "datasets map" if args.datasets_map else "moetrain"
        r.update(corpus_mb=round(size / 1e6), tokenizer=args.tokenizer, vocab_size=args.vocab_size, method=method)
        print(f"| {r['corpus_mb']} MB | {args.tokenizer} {args.vocab_size} | {w}{' (datasets map)' if args.datasets_map else ''} | {r['tokens'] / 1e6:.1f} M | "
              f"{r['seconds']:.0f} | {r['tokens_per_s'] / 1e3:.0f} K | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['cpu_s']:.0f} | {r['tokens'] / max(r['cpu_s'], 1e-9) / 1e3:.0f} K | {r['peak_pss_mib']} | {r['peak_rss_mib']} | {r['load_before']:.1f} |", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(r) + "\n")
        if not args.keep:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
