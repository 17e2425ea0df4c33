"""Programmatic dependent launch (PDL) for the decode kernels, on Hopper and later GPUs.

Inside a CUDA graph every kernel normally waits for the previous one to finish and drain before its programs even
start. A kernel launched with PDL starts while its predecessor is still running: its programs wait at `gdc_wait`
until the predecessor's writes are visible (`kernels.common.pdl_start`). Each kernel also calls `gdc_launch_dependents` first thing, so that
the next one can be scheduled as soon as all of its own programs are running.

Rules for a kernel with a PDL flag: before `gdc_wait` it reads only constant tensors (weights, scales) and writes
nothing; both calls are no-ops when the launch did not ask for PDL.

Off by default: measured on an H200 (bench/RESULTS.md, when the integer GEMV also requested its first block before
the wait), whole frames got slower with it (q4 5.38 -> 6.05 ms, fp8 5.49 -> 7.00 ms) although single GEMVs at
their best configs got a little faster. On an H100 (fourth session in bench/RESULTS.md) other placements (waiting
first, then letting the next kernel launch; waiting only; either with an L2 prefetch of the integer GEMV's first
weight blocks before the wait) moved whole frames by no more than the run-to-run spread; in the eighth session
every format got slower with it (bf16 146.5 -> 133.2, q2 241 -> 199 frames/s). `S2CONV_PDL=1` turns it on.
"""
from __future__ import annotations

import os

import torch

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CAPABLE: dict[torch.device, bool] = {}


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL: S2CONV_PDL=1, a CUDA device of compute capability >= 9.0,
    not under triton's interpreter."""
    if device.type != "cuda" or _INTERPRETED or os.environ.get("S2CONV_PDL", "0") != "1":
        return False
    ok = _CAPABLE.get(device)
    if ok is None:
        ok = _CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return ok


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch with a `PDL` constexpr flag: PDL=..., plus launch_pdl when on."""
    on = pdl_enabled(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
