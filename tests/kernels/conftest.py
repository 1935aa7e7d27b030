"""The kernel tests run compiled on a CUDA GPU and, without one, on the CPU through Triton's
interpreter: the same tests, the switch is automatic (TRITON_INTERPRET is set in
tests/conftest.py before triton can be imported, which is when Triton reads it)."""

import pytest
import torch

from moetrain.kernels import interpreter_enabled

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and not interpreter_enabled():
    raise pytest.UsageError("tests/kernels needs TRITON_INTERPRET=1 without a GPU "
                            "(tests/conftest.py sets it; was it overridden?)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 rows x 16 columns: many programs and ragged tails even at tiny shapes."""
    from moetrain.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_TILE", 64)
    monkeypatch.setattr(triton_ops, "_MAX_COLS", 16)
