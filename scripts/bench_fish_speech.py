"""Baseline alone: fish-speech's own decode step (`decode_one_token_ar`) at S2 Pro shapes, random bf16 weights
(`s2conv.bench.time_fish_speech`; `s2conv bench --fish-speech eager,compiled` times it beside s2conv).

Needs the `fish-speech` package (0.1.0 from the package registry) and its light imports (einops, loguru, loralib).
--compile: fish-speech's `torch.compile(mode="reduce-overhead")` variant (4-8 minutes of compilation).

    python scripts/bench_fish_speech.py --frames 20 [--compile]
"""
from __future__ import annotations

import argparse

import torch

from s2conv.bench import time_fish_speech


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    r = time_fish_speech(args.compile, args.frames)
    print(f"fish-speech 0.1.0 decode_one_token_ar ({'compiled' if args.compile else 'eager'}), "
          f"{torch.cuda.get_device_name()}: {r['ms_per_frame']:.2f} ms/frame = {r['frames_per_s']:.1f} frames/s; "
          f"first call {r['first_call_s']:.1f} s (compilation and graph capture when compiled)")


if __name__ == "__main__":
    main()
