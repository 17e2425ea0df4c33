"""Time the RMSNorm kernel (`fused._rms_norm_kernel`, with and without its residual add) at S2 Pro's width on one
GPU for several warp counts, graph-replayed like a decode frame: microseconds per launch.

Usage: python scripts/probe_norm.py
"""
from __future__ import annotations

import torch
import triton

from s2conv.runtime.kernels import fused
from s2conv.runtime.kernels.ops import graph_time_ms
from s2conv.schema import S2Config


def main() -> None:
    n = S2Config().dim
    print(torch.cuda.get_device_name(), f"(row width {n})")
    x, r = (torch.randn(1, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    h, y = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(n)
    for res in (False, True):
        for warps in (1, 2, 4, 8, 16):
            def call():
                fused._rms_norm_kernel[(1,)](x, r, w, h, y, n, n, n, 1e-6, HAS_RES=res, BLOCK=block, FIX_X=False,
                                             FIX_Y=False, PDL=False, num_warps=warps)
            us = graph_time_ms(call, calls=64) * 1e3
            print(f"{'add + norm' if res else 'norm'}, {warps:2d} warps: {us:5.2f} us per launch")


if __name__ == "__main__":
    main()
