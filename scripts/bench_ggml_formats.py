"""Quantize throughput of s2conv's ggml formats vs gguf-py on one [9728, 2560] float32 tensor (an S2 Pro MLP
weight). Usage: python scripts/bench_ggml_formats.py [format ...]; pin cores with `taskset -c 0,1` to model the
2-core export machine. gguf-py is timed on the first 1024 rows (it is single-threaded and slow)."""
import sys
import time

import numpy as np
from gguf import quants

from s2conv.quant_formats import get_format


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(names: list[str]) -> None:
    w = np.random.default_rng(0).standard_normal((9728, 2560), dtype=np.float32) * 0.02
    head = w[:1024]
    print(f"{'format':8s} {'s2conv M/s':>11s} {'gguf-py M/s':>12s}")
    for name in names:
        fmt = get_format(name)
        ours = w.size / best_of(lambda: fmt.quantize(w)) / 1e6
        ref = head.size / best_of(lambda: quants.quantize(head, fmt.ggml_type), 1) / 1e6
        print(f"{name:8s} {ours:11.0f} {ref:12.0f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "tq2_0", "f16", "bf16"])
