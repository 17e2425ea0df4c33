"""Shared fixtures: synthetic checkpoints generated once per test session."""
import pytest

from s2conv.checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a `tiny` synthetic checkpoint (seed 0). Read-only: copy it before modifying."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0)
