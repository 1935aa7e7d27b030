"""FP8 training's tests (docs/fp8.md). They need torchao, which `pip install -e ".[dev]"`
installs (through the fp8 extra); without it they skip, all with the one reason below."""

from __future__ import annotations

import pytest

from moetrain.fp8 import torchao_available

TORCHAO_MISSING = "needs torchao (the fp8 extra, part of dev: pip install -e '.[dev]')"
needs_torchao = pytest.mark.skipif(not torchao_available(), reason=TORCHAO_MISSING)


def require_torchao() -> None:
    """Skip the calling test module when torchao is missing; call it before its torchao
    imports."""
    pytest.importorskip("torchao", reason=TORCHAO_MISSING)
