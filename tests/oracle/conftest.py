import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_restored_determinism():
    """One intra-op thread (the tiny model runs ~10x slower on two threads of a busy 2-core
    machine) and the global determinism switch put back (`init_runtime` sets it)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
