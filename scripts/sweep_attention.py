"""Whole-frame sweep of the slow AR's Triton decode attention launch shape: keys per loop step, warps per program
and programs per SM (the key splits, `fused.attention_splits`), each timed on the graph-replayed frame loop
(`bench.time_decode`) against the shipped setting in the same process. The attention launches early under PDL
beside the GEMVs, so a shape is judged on frames rather than on launches in isolation (`probe_attention.py`).
The fast AR's attention (~10 keys) keeps its shape; spans above `fused.ATTN_GQA_SPAN` take the per-KV-head
kernel, which this does not sweep.

  --shapes 'BLOCK_N,WARPS,PER_SM;...'   WARPS 0: one per 32 keys of a step (the default rule)
  --prompts 256,700                      prompt lengths (the slow AR's spans follow them)

Usage: python scripts/sweep_attention.py [--formats q4] [--frames 100] [--rounds 2]
       [--shapes '32,1,4;16,1,8;64,1,4;64,4,4'] [--prompts 256,700]   (a CUDA GPU)
"""
from __future__ import annotations

import argparse

import torch

from s2conv.bench import build_model, quantize_model, time_decode
from s2conv.runtime.kernels import fused
from s2conv.schema import S2Config


def set_shape(block_n: int, warps: int, per_sm: int):
    """Point the slow AR's per-query-head attention (spans of 64 keys and more; the fast AR's ~10 keys keep the
    shipped shape) at this shape; returns a function that restores the shipped one. Spans above
    `fused.ATTN_GQA_SPAN` go to the per-KV-head kernel, whose shape this does not touch."""
    shipped_attention, shipped_splits = fused._attention, fused.attention_splits

    def splits(span, rows, device, block_n_=fused.ATTN_BLOCK_N, per_sm_=None, max_splits=None):
        # the grouped kernel passes its own programs per SM; the per-query-head one leaves the default
        return shipped_splits(span, rows, device, block_n_, per_sm if per_sm_ is None else per_sm_, max_splits)

    def attention(op, q, fused_args, k_cache, v_cache, pos, span, *rest):
        if min(span or k_cache.shape[2], k_cache.shape[2]) < 64:
            return shipped_attention(op, q, fused_args, k_cache, v_cache, pos, span, *rest)
        saved = fused.ATTN_BLOCK_N, fused.ATTN_WARPS
        fused.ATTN_BLOCK_N, fused.ATTN_WARPS, fused.attention_splits = block_n, warps or None, splits
        try:
            return shipped_attention(op, q, fused_args, k_cache, v_cache, pos, span, *rest)
        finally:
            (fused.ATTN_BLOCK_N, fused.ATTN_WARPS), fused.attention_splits = saved, shipped_splits

    fused._attention = attention
    return lambda: setattr(fused, "_attention", shipped_attention)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", default="256")
    ap.add_argument("--shapes", default="32,1,4;16,1,8;64,1,4;64,4,4")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if any(len(s) != 3 or s[0] < 16 or s[0] & (s[0] - 1) or s[2] < 1 for s in shapes):
        raise SystemExit("--shapes: BLOCK_N (a power of two >= 16),WARPS,PER_SM (>= 1) triples, ';' between them")
    print(torch.cuda.get_device_name())
    for fmt in args.formats.split(","):
        model = build_model(S2Config())
        if fmt != "bf16":
            quantize_model(model, fmt, "all")
        for prompt in (int(p) for p in args.prompts.split(",")):
            for r in range(args.rounds):
                for shape in [None, *shapes]:
                    restore = set_shape(*shape) if shape else (lambda: None)
                    try:
                        spf, _ = time_decode(model, prompt, args.frames)
                    finally:
                        restore()
                    name = "shipped" if shape is None else "block_n %d warps %d per_sm %d" % shape
                    print(f"{fmt:6s} prompt {prompt:5d} round {r + 1} {name:28s} {spf * 1e3:6.3f} ms/frame "
                          f"{1 / spf:7.1f} frames/s", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
