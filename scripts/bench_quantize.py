"""Benchmark s2conv's S2 quantizers (fp8, q8, q4, q3, q2) on full S2 Pro linear shapes, beside gguf-py's Q8_0/Q4_0.

Synthetic heavy-tailed bf16 weights (Student-t df=5, outlier columns); prints M weights/s per format and method and
the extrapolated time for the model's 4.05e9 linear weights. Usage: python scripts/bench_quantize.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from s2conv.quant_formats import get_format

SHAPES = [(6144, 2560), (2560, 4096), (9728, 2560), (9728, 2560), (2560, 9728)]  # one slow-AR layer's linears
MODEL_LINEAR_WEIGHTS = 4.05e9


def make_weights(shapes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in shapes:
        w = torch.randn(rows, cols, generator=g) / torch.sqrt(torch.distributions.Chi2(5.0).sample((rows, cols)) / 5)
        w[:, torch.randperm(cols, generator=g)[: cols // 256]] *= 6
        out.append((w * 0.02).to(torch.bfloat16))
    return out


def bench(fn, weights) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) to run fn on every weight."""
    t0, c0 = time.perf_counter(), time.process_time()
    for w in weights:
        fn(w)
    return time.perf_counter() - t0, time.process_time() - c0


def report(label: str, n: int, wall: float, cpu: float) -> None:
    rate = n / wall / 1e6
    print(f"{label:18s} {rate:8.1f} M weights/s   wall {wall:6.2f} s  cpu {cpu:6.2f} s   "
          f"full model ({MODEL_LINEAR_WEIGHTS / 1e9:.2f}e9): {MODEL_LINEAR_WEIGHTS / (rate * 1e6):6.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one [9728, 2560] tensor only")
    ap.add_argument("--formats", default="fp8,q8,q4,q3,q2")
    ap.add_argument("--no-gguf", action="store_true", help="skip gguf-py's Q8_0/Q4_0")
    args = ap.parse_args()
    shapes = [(9728, 2560)] if args.quick else SHAPES
    weights = make_weights(shapes)
    n = sum(w.numel() for w in weights)
    print(f"{len(weights)} tensors, {n / 1e6:.1f} M weights; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    get_format("q4").quantize(weights[0][:64])  # warm up
    for name in args.formats.split(","):
        fmt = get_format(name)
        for method in ("rtn", "search"):
            wall, cpu = bench(lambda w: fmt.quantize(w, method=method), weights)
            report(f"{name} {method}", n, wall, cpu)
    if not args.no_gguf:
        for qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
            wall, cpu = bench(lambda w: gq.quantize(w.float().numpy(), qtype), weights)
            report(f"gguf-py {qtype.name}", n, wall, cpu)
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
