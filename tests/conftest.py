"""Shared fixtures: synthetic checkpoints generated once per test session."""
import os

import torch

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton is first imported
# (whichever test module imports it first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from s2conv.checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a `tiny` synthetic checkpoint (seed 0). Read-only: copy it before modifying."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0)
