"""Probe: the fused top-k sampling kernel (`kernels/sampling.topk_sample`) at S2's rows, graph-replayed: the fast
AR's 4096 codes (one draw) and the slow AR's 4097 semantic columns (RAS: two draws), top-k 30, with the launch's
warps and candidate slots overridden (the kernel ranks in half its slots first, in all of them where more logits
reach its threshold). Prints microseconds per launch.

    python scripts/probe_sampling.py [--warps 4,8,16] [--cap 64,128]
"""
from __future__ import annotations

import argparse

import torch

from s2conv.runtime.kernels import sampling
from s2conv.runtime.kernels.ops import graph_time_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warps", default="0,4,8,16", help="num_warps per launch (0: the launcher's choice)")
    ap.add_argument("--cap", default="128,64", help="the kernel's candidate slots (it ranks in half of them first)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    for v, draws in ((4096, [(0.8, 0.8)]), (4097, [(0.8, 0.8), (1.0, 0.9)])):
        logits = (torch.randn(1, v, device="cuda", generator=g) * 3).to(torch.bfloat16)
        noise = torch.empty(len(draws), 1, 30, device="cuda").exponential_(generator=g)
        want = sampling.topk_sample(logits, None, None, noise, draws, 30)
        for cap in map(int, args.cap.split(",")):
            for warps in map(int, args.warps.split(",")):
                sampling._CAP, sampling._WARPS = cap, warps or None
                got = sampling.topk_sample(logits, None, None, noise, draws, 30)
                us = graph_time_ms(lambda: sampling.topk_sample(logits, None, None, noise, draws, 30), calls=32) * 1e3
                same = "same tokens" if torch.equal(got, want) else "OTHER TOKENS"
                print(f"V {v} draws {len(draws)} cap {cap:3d} warps {warps or 'auto':>4}: {us:6.2f} us ({same})")
    sampling._CAP, sampling._WARPS = 128, None


if __name__ == "__main__":
    main()
