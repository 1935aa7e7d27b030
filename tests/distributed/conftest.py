"""The single-process reference runs every layout test compares with, once per session."""

import pytest

from tests.distributed.equivalence import REFERENCES, run_layouts


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    return run_layouts(1, REFERENCES, tmp_path_factory.mktemp("references"))
