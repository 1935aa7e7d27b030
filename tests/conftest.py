"""Suite-wide setup: Triton's interpreter without a GPU; one prepared-data cache for the whole
session, never ~/.cache."""

import os

import pytest
import torch

# The Triton kernels (tests/kernels) run compiled on a GPU and, without one, on the CPU through
# Triton's interpreter. Triton reads TRITON_INTERPRET when it is first imported (it wraps its own
# library functions then), and `import torch._dynamo` imports triton, so this is set here, before
# any test module is imported. Only where no GPU is visible, where Triton can run nothing
# compiled anyway: torch.compile's CPU backend (C++) does not use Triton, and moetrain's
# `model.moe.kernels=auto` never picks the interpreter.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_cache(tmp_path_factory):
    """Point $MOETRAIN_CACHE at a session folder; child processes (torchrun, CLI) inherit it."""
    if os.environ.get("MOETRAIN_TEST_CACHE"):  # reuse across sessions when a developer asks for it
        os.environ["MOETRAIN_CACHE"] = os.environ["MOETRAIN_TEST_CACHE"]
    else:
        os.environ["MOETRAIN_CACHE"] = str(tmp_path_factory.mktemp("moetrain_cache"))
    yield
