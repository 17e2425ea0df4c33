"""Probe: the tensor-core kernel of the fragment layout (`triton_mma.mma_linear_kernel`) against the dp2a GEMV on the
interleaved layout, at S2's four layer shapes, M = 1, graph-timed with rotating weights; a sweep of warps (tiles)
per program and split-K. Both layouts are packed from the same codes, whatever layout the format uses at run time
(the interleaved one only for formats its kernels take: no mins, groups of 64 codes or more).

    python scripts/probe_mma.py [--formats q4,q2,q4_0] [--warps 1,2] [--splits 2,4,8,16]
    TRITON_INTERPRET=1 python scripts/probe_mma.py --small     (the correctness check at small shapes)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from probe_variants import copies, device, per_layer, run_cases  # noqa: E402

from s2conv.runtime.kernels import ops  # noqa: E402
from s2conv.runtime.kernels.layout import (INT_SPECS, fragment_unit, pack_fragment_codes,  # noqa: E402
                                           pack_int_codes, padded_k)

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interleaved(x, p, spec):
    """The landed GEMV on the interleaved layout, whatever `int_linear_impl` would pick for the format;
    p = (qweight, scales[, mins])."""
    fragment, ops._fragment = ops._fragment, lambda *a: False
    try:
        return ops.int_linear_impl(x, p[0], p[1], p[2] if len(p) > 2 else None, spec.bits, spec.offset, spec.group,
                                   False)
    finally:
        ops._fragment = fragment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4,q2,q4_0")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--warps", default="1,2")
    ap.add_argument("--splits", default="2,4,8,16")
    args = ap.parse_args()
    dev, shapes = device(args.small or _INTERPRETED)
    configs = list(itertools.product(*(map(int, getattr(args, a).split(",")) for a in ("warps", "splits"))))
    torch.manual_seed(0)
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        totals: dict[str, float] = {}
        ok_all = True
        for shape, (n, k, _) in shapes.items():
            codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), device=dev)
            scales = torch.rand(n, k // spec.group, device=dev) + 0.5
            mins = torch.rand(n, k // spec.group, device=dev) if spec.has_min else None
            x = torch.randn(1, k, device=dev).to(torch.bfloat16)
            w = codes.float() * scales.repeat_interleave(spec.group, 1)
            ref = x.float() @ (w if mins is None else w - mins.repeat_interleave(spec.group, 1)).T

            def padded(kp):
                return tuple(torch.nn.functional.pad(t, (0, kp // spec.group - t.shape[1])).contiguous()
                             for t in (scales, mins) if t is not None)

            unit = fragment_unit(spec.bits, spec.group)
            old = (pack_int_codes(codes, spec.bits, spec.offset), *padded(padded_k(k)))
            new = (pack_fragment_codes(codes, spec.bits, spec.offset, spec.group), *padded(-(-k // unit) * unit))
            nbytes = sum(t.numel() * 4 for t in old)
            olds = copies(nbytes, lambda: tuple(t.clone() for t in old)) if dev == "cuda" else [old]
            news = copies(nbytes, lambda: tuple(t.clone() for t in new)) if dev == "cuda" else [new]
            line = "interleaved -"  # the interleaved layout's kernels take no mins and no groups under 64 codes
            if mins is None and spec.group >= 64:
                line, ok = run_cases({"interleaved": lambda p: interleaved(x, p, spec)}, old, olds, ref, dev, totals)
                ok_all &= ok
            cases = {"fragment": lambda p: ops.fragment_linear_impl(x, p[0], p[1], spec.bits, spec.offset,
                                                                    spec.group, False, mins=p[2] if mins is not None
                                                                    else None)}
            for nw, split in configs:
                cfg = ops.Config(block_n=16, split=split, num_warps=nw)
                cases[f"w{nw}s{split}"] = lambda p, c=cfg: ops.fragment_linear_impl(
                    x, p[0], p[1], spec.bits, spec.offset, spec.group, False, c,
                    mins=p[2] if mins is not None else None)
            sweep: dict[str, float] = {}
            ln, ok = run_cases(cases, new, news, ref, dev, sweep)
            ok_all &= ok
            best = min((us, name) for name, us in sweep.items() if name != "fragment")
            totals["fragment (default config)"] = totals.get("fragment (default config)", 0.0) + sweep["fragment"]
            totals["fragment (best config)"] = totals.get("fragment (best config)", 0.0) + best[0]
            print(f"{fmt} {shape} [{n}x{k}]: {line} | default {sweep['fragment']:.1f} | best {best[1]} "
                  f"{best[0]:.1f}", flush=True)
            print("   all: " + ln, flush=True)
        per_layer(fmt, totals)
        print(f"{fmt}: every case right: {ok_all}", flush=True)


if __name__ == "__main__":
    main()
