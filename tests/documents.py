"""Short documents for the tests of document masking and multi-token prediction: the shipped
corpus's paragraphs as JSON lines (scripts/make_documents.py), written once into the prepared-
data cache and prepared there like any source (several document boundaries in every window of
the tiny experiment's 128 tokens).

    overrides = documents_overrides()     # ["data.sources=[{path: ...}]"]; call inside a test
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tests.harness import ROOT


def documents_file() -> Path:
    """The JSON-lines corpus under $MOETRAIN_CACHE (the session's cache: tests/conftest.py),
    written on first use; the same bytes every time, so its prepared data is reused."""
    out = Path(os.environ["MOETRAIN_CACHE"]) / "documents" / "speeches.jsonl"
    if not out.is_file():
        spec = importlib.util.spec_from_file_location("make_documents",
                                                      ROOT / "scripts" / "make_documents.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write(out)
    return out


def documents_overrides() -> list[str]:
    return [f"data.sources=[{{path: '{documents_file()}'}}]"]


__all__ = ["documents_file", "documents_overrides"]
