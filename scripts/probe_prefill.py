"""Probe: where prefill should switch from the fused kernels to the weight dequantized once plus cuBLAS
(`kernels/dequant.py`'s PREFILL_M). Per S2 layer as prefill runs it (wqkv, wo, w1, w3, w2: w1 and w3 separately),
M rows of bf16 x, both paths through the format's launcher (`KERNELS[fmt]` with PREFILL_M above and below M),
each checked against the dequantized reference first, graph-timed with rotating weight copies.

    python scripts/probe_prefill.py [--formats q4,q4_k,q2_k,q8_0,fp8] [--m 32 64 96 128 192 256 512]
    TRITON_INTERPRET=1 python scripts/probe_prefill.py --small     (the correctness check at small shapes)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from probe_variants import copies, device, per_layer, run_cases  # noqa: E402

from s2conv.runtime.kernels import INT_SPECS, KERNELS, REPACK, dequant, dequantize_packed  # noqa: E402

PREFILL_SHAPES = {"wqkv": (6144, 2560), "wo": (2560, 4096), "w1": (9728, 2560), "w3": (9728, 2560),
                  "w2": (2560, 9728)}
SMALL = {"a": (48, 1024), "b": (40, 512)}


def random_packed(fmt: str, n: int, k: int, dev: str) -> dict:
    """REPACK[fmt] of random codes over the format's whole range and scales (and mins) near real magnitudes."""
    if fmt == "fp8":
        return REPACK[fmt](torch.randn(n, k, device=dev).to(torch.float8_e4m3fn), torch.rand(n, device=dev) * 0.01)
    if fmt == "q8":
        return REPACK[fmt](torch.randint(-127, 128, (n, k), device=dev), torch.rand(n, device=dev) * 1e-3)
    spec = INT_SPECS[fmt]
    codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), device=dev)
    scales = torch.rand(n, k // spec.group, device=dev) * 0.01 + 1e-3
    mins = (torch.rand(n, k // spec.group, device=dev) * 0.01,) if spec.has_min else ()
    return REPACK[fmt](codes, scales, *mins)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4,q4_k,q2_k,q8_0,fp8")
    ap.add_argument("--m", type=int, nargs="+", default=[32, 64, 96, 128, 192, 256, 512])
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    small = args.small or os.environ.get("TRITON_INTERPRET") == "1"
    dev, _ = device(small)
    shapes = SMALL if small else PREFILL_SHAPES
    torch.manual_seed(0)
    every = {}
    for fmt in args.formats.split(","):
        launcher = KERNELS[fmt]
        # ~1 byte a weight (4-bit formats: half that, so their copies cover L2 twice over); the check needs two
        packs = {shape: copies(1 << 40 if small else n * k, lambda: random_packed(fmt, n, k, dev))
                 for shape, (n, k) in shapes.items()}

        def through(m_switch: int, x: torch.Tensor):
            def call(p: dict) -> torch.Tensor:
                dequant.PREFILL_M = m_switch
                return launcher(x, p)
            return call

        for m in args.m:
            totals: dict[str, float] = {}
            for shape, (n, k) in shapes.items():
                x = (torch.randn(m, k, device=dev) * 0.5).to(torch.bfloat16)
                first = packs[shape][0]
                ref = x.float() @ dequantize_packed(fmt, first, k).T.float()
                cases = {"fused": through(1 << 30, x), "dequantized": through(1, x)}
                line, ok = run_cases(cases, first, packs[shape], ref, dev, totals)
                every[fmt] = every.get(fmt, True) and ok
                print(f"{fmt} M={m} {shape}: {line}", flush=True)
            per_layer(f"{fmt} M={m}", totals)
    dequant.PREFILL_M = 128
    if not all(every.values()):
        sys.exit("a path disagreed with the reference")


if __name__ == "__main__":
    main()
