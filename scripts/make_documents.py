"""A corpus of many short documents from the shipped one: every speech, stage direction and
sonnet of data/corpus/*.txt (blank-line-separated paragraphs) as one JSON line.

    python scripts/make_documents.py /tmp/speeches.jsonl
    python -m moetrain.train +experiment=tiny "data.sources=[{path: /tmp/speeches.jsonl}]" \\
        data.document_mask=true

The shipped corpus is twelve documents of 100-175 kB, so a window of 128 tokens almost never
holds a document boundary; this one (about 12,000 documents) puts several in
every window - what document masking and the MTP boundary rules are tested and measured on
(tests/documents.py, docs/documents.md). Deterministic: the same file every time.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"


def documents(corpus: Path = CORPUS) -> list[str]:
    """The paragraphs of every .txt file of `corpus`, in file order, whitespace normalised."""
    docs = []
    for path in sorted(corpus.glob("*.txt")):
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            text = "\n".join(line.strip() for line in para.strip().splitlines())
            if text:
                docs.append(text)
    return docs


def write(out: Path, corpus: Path = CORPUS) -> int:
    """Write the documents as JSON lines {"text": ...} to `out` (atomically); returns how many."""
    docs = documents(corpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(out)
    return len(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the .jsonl file to write")
    args = ap.parse_args()
    print(f"{write(args.out)} documents -> {args.out}")


if __name__ == "__main__":
    main()
