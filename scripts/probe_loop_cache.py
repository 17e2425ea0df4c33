"""Time a pipeline-like sequence of `generate_frames` calls (prompts growing as a conversation's history does,
then a second request alike) with the FrameLoop and its CUDA graphs kept between calls and, as the baseline in the
same process, made anew each call (S2CONV_FRAME_LOOP_CACHE=0). --vary-sampling: each call samples with another
temperature and top_p (as a server's requests may), cycling through three pairs. --batch B: each call decodes
B prompts at once (`generate_frames_batch`; call i takes prompts i, i + 1, ... of the list, cycling).

Usage: python scripts/probe_loop_cache.py [--format q4] [--frames 150] [--prompts 300,520,740,300,520,740]
       [--vary-sampling] [--batch B]   (a CUDA GPU)
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from s2conv.bench import build_model, quantize_model
from s2conv.runtime.batch import generate_frames_batch
from s2conv.runtime.frame_loop import generate_frames
from s2conv.runtime.sampling import SamplingParams
from s2conv.schema import S2Config


def sequence(model, prompts, frames: int, settings: list[SamplingParams], batch: int = 1) -> tuple[list[float], int]:
    """Seconds per call and frames in all, from fresh KV caches and no kept loop; call i samples with
    settings[i % len(settings)]."""
    model.frame_loop, model.batch_loop, model.max_batch = None, None, 0
    times, total = [], 0
    for i, p in enumerate(prompts):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        params = settings[i % len(settings)]
        if batch > 1:
            rows = [prompts[(i + r) % len(prompts)] for r in range(batch)]
            n = sum(c.shape[1] for c in generate_frames_batch(model, rows, frames, params, seed=i))
        else:
            n = generate_frames(model, p, frames, params, seed=i).shape[1]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        total += n
    return times, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="q4")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--prompts", default="300,520,740,300,520,740")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vary-sampling", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    cfg = S2Config()
    model = build_model(cfg)
    if args.format != "bf16":
        quantize_model(model, args.format, "all")
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = []
    for t in map(int, args.prompts.split(",")):
        p = torch.zeros(cfg.num_codebooks + 1, t, dtype=torch.long, device="cuda")
        p[0] = torch.randint(0, cfg.semantic_begin_id, (t,), device="cuda", generator=g)
        prompts.append(p)
    pairs = [(0.8, 0.8), (0.7, 0.9), (1.0, 0.95)] if args.vary_sampling else [(0.8, 0.8)]
    params = [SamplingParams(temperature=t, top_p=p, top_k=30) for t, p in pairs]
    print(f"GPU: {torch.cuda.get_device_name()}; {args.format}, prompts {args.prompts}, up to {args.frames} frames, "
          f"(temperature, top_p) {pairs}, batch {args.batch}")
    sequence(model, prompts, args.frames, params, args.batch)  # compiles every kernel
    for r in range(args.rounds):
        for keep in ("0", "1"):
            os.environ["S2CONV_FRAME_LOOP_CACHE"] = keep
            times, total = sequence(model, prompts, args.frames, params, args.batch)
            label = "kept loop " if keep == "1" else "new loop  "
            print(f"round {r + 1} {label}: calls {' / '.join(f'{1e3 * t:.0f}' for t in times)} ms, "
                  f"{total} frames in {sum(times):.3f} s = {total / sum(times):.1f} frames/s")


if __name__ == "__main__":
    main()
