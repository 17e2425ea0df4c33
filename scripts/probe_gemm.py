"""Probe: launch configurations of the small-M integer GEMM (batched decode) at S2's four layer shapes, against
cuBLAS bf16 at the same M; graph-timed with rotating weights, each configuration checked against the dequantized
fp32 reference first.

    python scripts/probe_gemm.py [--formats q4,q2] [--m 32] [--budget-s 400]     (a CUDA GPU)
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from s2conv.bench import output_error
from s2conv.runtime.kernels import INT_SPECS, ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_int_dot import SHAPES, layer_case  # noqa: E402


def configs(m: int, pairs: list[tuple[int, int]], stages: list[int]) -> list[ops.Config]:
    """Every (block_n, warps) pair x stages x split 1/2/4/8 at M's row tile; each (block_n, warps, stages) is one
    compilation (block_n 16 and 2 warps never won on an H100 at M = 32, q4)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return [ops.Config(bn, sp, w, st, block_m=bm) for bn, w in pairs for st in stages for sp in (1, 2, 4, 8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4")
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--kernel", default="", help="a module in scripts/ whose int_gemm_kernel replaces the landed one")
    ap.add_argument("--grid", default="64:4,64:8,32:4", help="block_n:warps pairs to sweep")
    ap.add_argument("--stages", default="1,2")
    args = ap.parse_args()
    if args.kernel:
        import importlib
        ops.int_gemm_kernel = importlib.import_module(args.kernel).int_gemm_kernel
    pairs = [tuple(map(int, p.split(":"))) for p in args.grid.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    print("device:", torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    failed = False
    m = args.m
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        tot_default = tot_best = tot_cublas = 0.0
        for name, (n, k, gated) in SHAPES.items():
            p, w, x, ref, packs = layer_case(fmt, n, k, gated, m, g)
            wbytes = sum(t.numel() * t.element_size() for t in p.values())
            copies = len(packs)
            wb = w.to(torch.bfloat16)
            bcopies = max(2, int(120e6 // (wb.numel() * 2)) + 1)
            bf = [wb.clone() for _ in range(bcopies)]
            it = itertools.count()
            cublas = ops.graph_time_ms(lambda: x @ bf[next(it) % bcopies].T, calls=2 * bcopies, reps=10) * 1e3
            default = ops.default_config("int", spec.bits, n, k, m, torch.device("cuda"), gated, spec.group)
            results = []
            for cfg in [default] + configs(m, pairs, stages):
                if time.time() - t0 > args.budget_s:
                    break
                call = lambda q: ops.int_linear_impl(x, q["qweight"], q["scales"], q.get("mins"), spec.bits,  # noqa
                                                     spec.offset, spec.group, gated, config=cfg)
                try:
                    err, max_rel, ok = output_error(call(p), ref)
                    it = itertools.count()
                    us = ops.graph_time_ms(lambda: call(packs[next(it) % copies]), calls=2 * copies, reps=10) * 1e3
                except Exception as e:  # noqa: BLE001 -- a config too big for the card
                    print(f"  {cfg}: {type(e).__name__}")
                    continue
                failed |= not ok
                results.append((us, cfg, ok))
            d_us = results[0][0]
            best = min(results, key=lambda r: r[0])
            top = sorted(results, key=lambda r: r[0])[:4]
            tot_default += d_us
            tot_best += best[0]
            tot_cublas += cublas
            print(f"{fmt} M={m} {name:6s} {wbytes / 1e6:5.1f} MB: cuBLAS bf16 {cublas:.1f} us, default {d_us:.1f} us, "
                  f"best {best[0]:.1f} us; top: " + " | ".join(
                      f"bn{c.block_n} sp{c.split} w{c.num_warps} st{c.num_stages} bm{c.block_m} {u:.1f}"
                      + ("" if ok else " WRONG") for u, c, ok in top), flush=True)
        print(f"{fmt} M={m} per layer: cuBLAS bf16 {tot_cublas:.1f} us, default {tot_default:.1f}, best {tot_best:.1f}"
              f" ({time.time() - t0:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
