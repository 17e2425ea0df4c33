"""Where the kernel tests run: the GPU, else triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1
before anything imports triton). A kernel test module starts with `DEVICE = kernel_device()`, before it imports
the kernels."""
from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> str:
    """"cuda" or "cpu"; skips the calling module without triton, or on a CPU where triton was imported without
    its interpreter (the kernels would be compiled for a GPU that is not there)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)
    return "cpu"
