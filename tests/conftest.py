"""Suite-wide fixtures: one prepared-data cache for the whole session, never ~/.cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_cache(tmp_path_factory):
    """Point $MOETRAIN_CACHE at a session folder; child processes (torchrun, CLI) inherit it."""
    if os.environ.get("MOETRAIN_TEST_CACHE"):  # reuse across sessions when a developer asks for it
        os.environ["MOETRAIN_CACHE"] = os.environ["MOETRAIN_TEST_CACHE"]
    else:
        os.environ["MOETRAIN_CACHE"] = str(tmp_path_factory.mktemp("moetrain_cache"))
    yield
