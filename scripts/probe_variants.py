"""What the one-row GEMV variant probes share (probe_tma.py, probe_xquant.py, probe_mma.py, probe_kq.py): S2's layer
shapes, the output buffers of a split-K launch, and the loop that checks each variant against the reference and
graph-times it with rotating weight copies. Imported by those scripts (run from the repository root)."""
from __future__ import annotations

import itertools
from typing import Callable

import torch

from s2conv.bench import output_error
from s2conv.runtime.kernels import ops

# name -> (rows N, columns K, split-K of the landed kernel); w1|w3 as one weight of 2N rows
FULL_SHAPES = {"wqkv": (6144, 2560, 1), "wo": (2560, 4096, 4), "w1|w3": (19456, 2560, 1), "w2": (2560, 9728, 4)}
SMALL_SHAPES = {"a": (48, 1024, 1), "b": (32, 1536, 2)}  # the interpreter's correctness check
ROTATE_BYTES = 120e6  # weight copies cycled through per timing, more than L2 holds

_COUNTERS: dict = {}


def device(small: bool) -> tuple[str, dict]:
    """("cuda" or "cpu", the shapes to probe); prints the GPU's name."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        print("device:", torch.cuda.get_device_name())
    return dev, SMALL_SHAPES if small else FULL_SHAPES


def split_outputs(n: int, n_blocks: int, split: int, dtype, dev) -> tuple:
    """(blocks per split, split, y [1, n], fp32 partials [split, n], counters) for a one-row launch that finishes
    split-K in the launch (`common.finish_split`). The counters are zeroed once per (n, split) and reset by the
    launch itself, so a timed call adds no memset; without a split, partials and counters are y (unused)."""
    per = -(-n_blocks // split)
    split = -(-n_blocks // per)
    y = torch.empty(1, n, dtype=dtype, device=dev)
    if split == 1:
        return per, split, y, y, y
    key = (n, split, str(dev))
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(-(-n // 16), dtype=torch.int32, device=dev)
    return per, split, y, torch.empty(split, n, dtype=torch.float32, device=dev), _COUNTERS[key]


def copies(count_bytes: int, make: Callable[[], object]) -> list:
    """Enough fresh copies (make()) of a weight of count_bytes to rotate through ROTATE_BYTES."""
    return [make() for _ in range(max(2, int(ROTATE_BYTES // count_bytes) + 1))]


def run_cases(cases: dict[str, Callable], first, packs: list, ref: torch.Tensor, dev: str,
              totals: dict[str, float]) -> tuple[str, bool]:
    """Each case (a function of one weight copy) checked against ref on `first`, then graph-timed over `packs` on
    a GPU (0 us on the CPU); adds the us to totals. Returns (the shape's line, whether every case was right)."""
    line, ok_all = [], True
    for name, call in cases.items():
        err, max_rel, ok = output_error(call(first), ref)
        ok_all &= ok
        us = 0.0
        if dev == "cuda":
            it = itertools.count()
            us = ops.graph_time_ms(lambda: call(packs[next(it) % len(packs)]), calls=2 * len(packs), reps=10) * 1e3
        totals[name] = totals.get(name, 0.0) + us
        line.append(f"{name} {us:.1f}" + ("" if ok else f" WRONG({err:.1e},{max_rel:.1e})"))
    return " | ".join(line), ok_all


def per_layer(label: str, totals: dict[str, float]) -> None:
    """The per-layer sums of every case (only meaningful for cases timed at every shape)."""
    print(f"{label} per layer: " + ", ".join(f"{v} {t:.1f}" for v, t in totals.items()), flush=True)
