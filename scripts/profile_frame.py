"""Profile decode frames at full S2 Pro shapes: CUDA kernels per frame and GPU time by kernel, graph-replayed.

Usage: python scripts/profile_frame.py [FORMAT ...] [--batch B] [--top N]   (FORMAT: bf16, q4, ...; all linears quantized)
       python scripts/profile_frame.py [FORMAT ...] --prefill T     (one prefill of T tokens instead)
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from s2conv.bench import build_model, quantize_model
from s2conv.runtime.batch import BatchLoop, left_pad, prefill_batch
from s2conv.runtime.frame_loop import FrameLoop
from s2conv.runtime.sampling import SamplingParams
from s2conv.schema import S2Config


def _report(label: str, prof, frames: int, top: int = 25) -> None:
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"{label}: {frames} graphed frames: {count / frames:.0f} kernels/frame, "
          f"{total / frames / 1e3:.3f} ms GPU time/frame")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"{e.self_device_time_total / frames / 1e3:8.3f} ms {e.count / frames:6.0f}x  {e.key[:110]}")


@torch.inference_mode()
def profile_format(model, fmt: str, batch: int, frames: int = 7, top: int = 25) -> None:
    cfg = model.cfg
    params = SamplingParams()
    if batch <= 1:
        prompt = torch.randint(0, cfg.semantic_begin_id, (1, cfg.num_codebooks + 1, 256), device="cuda")
        prompt[:, 1:] = 0
        model.setup_caches(1, 512)
        hidden, logits = model.prefill(prompt)
        first = model.sample_frame(hidden, logits, params, None)
        loop = FrameLoop(model, params, frames + 1, use_graphs=True)
        run = lambda: loop.run(first, 256, frames + 1, model.max_seq)  # noqa: E731
    else:
        prompts = []
        for i in range(batch):
            p = torch.randint(0, cfg.semantic_begin_id, (cfg.num_codebooks + 1, 256 - 16 * (i % 8)), device="cuda")
            p[1:] = 0
            prompts.append(p)
        tokens, offsets = left_pad(prompts)
        first = prefill_batch(model, tokens, offsets, frames + 8, params)
        loop = BatchLoop(model, params, offsets, frames + 1, use_graphs=True)
        run = lambda: loop.run(first, tokens.shape[2], frames + 1)  # noqa: E731
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    _report(f"{fmt} batch {max(batch, 1)}", prof, frames, top)


@torch.inference_mode()
def profile_prefill(model, fmt: str, tokens: int) -> None:
    """GPU time by kernel of one prefill of `tokens` prompt tokens (eager, after a warm-up prefill)."""
    cfg = model.cfg
    prompt = torch.randint(0, cfg.semantic_begin_id, (1, cfg.num_codebooks + 1, tokens), device="cuda")
    prompt[:, 1:] = 0
    model.setup_caches(1, tokens + 8)
    model.prefill(prompt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.prefill(prompt)
        torch.cuda.synchronize()
    _report(f"{fmt} prefill of {tokens} tokens", prof, 1, top=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("formats", nargs="*", default=["bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    ap.add_argument("--top", type=int, default=25, help="kernels listed, by GPU time")
    args = ap.parse_args()
    for fmt in args.formats:
        model = build_model(S2Config())
        if fmt != "bf16":
            quantize_model(model, fmt, "all")
        if args.prefill:
            profile_prefill(model, fmt, args.prefill)
        else:
            profile_format(model, fmt, args.batch, top=args.top)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
