"""Quantization speed of s2conv's K-quants beside llama.cpp's reference quantizer (one thread, via tests/oracle.py).

    python scripts/bench_kquants.py [--rows 9728 --cols 2560] [--formats q4_k,q6_k]

Prints weights/s of both and whether the bytes are equal. The oracle needs `bash scripts/install_oracle.sh`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import load_ggml  # noqa: E402

from s2conv.quant_formats import get_format  # noqa: E402
from s2conv.quant_formats._kquant import _n_threads  # noqa: E402

MODEL_WEIGHTS = 4.05e9  # parameters of S2 Pro quantized by the converter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=9728)
    ap.add_argument("--cols", type=int, default=2560)
    ap.add_argument("--formats", default="q2_k,q3_k,q4_k,q5_k,q6_k")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    w = (rng.standard_t(3, (args.rows, args.cols)) * 0.02).astype(np.float32)
    ggml = load_ggml()
    if ggml is None:
        print("llama.cpp oracle not installed: timing s2conv only")
    print(f"tensor {args.rows}x{args.cols} ({w.size / 1e6:.1f} M weights, Student-t df 3)")
    print(f"s2conv threads: {_n_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("rates: weights per wall second, and per CPU second (all threads; meaningful on a shared, loaded machine)")
    for name in args.formats.split(","):
        fmt = get_format(name)
        ours, t_ours, c_ours = timed(fmt.quantize, w)
        line = (f"{name}: s2conv {rate(w, t_ours)} wall, {rate(w, c_ours)} cpu (full model "
                f"{MODEL_WEIGHTS / (w.size / t_ours) / 60:4.1f} min wall)")
        if ggml is not None:
            ref, t_ref, c_ref = timed(ggml.quantize, fmt.ggml_type, w)
            line += (f" | llama.cpp 1 thread {rate(w, t_ref)} wall, {rate(w, c_ref)} cpu"
                     f" | bytes equal: {bool((ours == ref).all())}")
        print(line, flush=True)


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def rate(w: np.ndarray, seconds: float) -> str:
    return f"{w.size / seconds / 1e6:5.1f} M/s"

if __name__ == "__main__":
    main()
