import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_rng():
    torch.manual_seed(0)
