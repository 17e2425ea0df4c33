"""Upper bounds for removing the frame's small launches: time the graph-replayed frame loop with chosen small
steps made free (their launch skipped, their output wrong), against the unchanged model in the same process.

  final     the final RMSNorms (slow and fast) return their input: what chaining them into the heads could save
  embed     the fast AR's codebook-embedding gather returns a fixed buffer: what folding it into the sampler could
  first     each stack's first-block attention norm returns its input (float formats launch it)

Usage: python scripts/probe_launch_cuts.py [--formats q4,fp8] [--frames 100] [--rounds 2]   (a CUDA GPU)
Not a benchmark of anything that runs correctly: an estimate of what a change could gain at most.
"""
from __future__ import annotations

import argparse

import torch

from s2conv.bench import build_model, quantize_model, time_decode
from s2conv.schema import S2Config


class _NoNorm:
    """The fused kernel table with `rms_norm` returning its input."""

    def __init__(self, kernels):
        self._k = kernels

    def __getattr__(self, name):
        return getattr(self._k, name)

    def rms_norm(self, x, weight, eps):
        return x


def cut(model, what: set[str]):
    """Apply the cuts; returns a function that undoes them."""
    undo = []
    if "final" in what:
        for norm in (model.norm, model.fast_norm):
            old = norm.forward
            norm.forward = lambda x: x
            undo.append(lambda n=norm, f=old: setattr(n, "forward", f))
    if "embed" in what:
        emb = model.fast_embeddings
        buf = emb.weight[:1].clone()
        emb.forward = lambda code: buf.expand(code.shape[0], -1)
        undo.append(lambda: emb.__dict__.pop("forward"))
    if "first" in what:
        for block in (model.layers[0], model.fast_layers[0]):
            old = block._fused
            block._fused = _NoNorm(old)
            undo.append(lambda b=block, k=old: setattr(b, "_fused", k))
    return lambda: [u() for u in reversed(undo)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4,fp8")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    cfg = S2Config()
    variants = [set(), {"final"}, {"embed"}, {"first"}, {"final", "embed", "first"}]
    for fmt in args.formats.split(","):
        model = build_model(cfg)
        if fmt != "bf16":
            quantize_model(model, fmt, "all")
        for r in range(args.rounds):
            for v in variants:
                undo = cut(model, v)
                spf, _ = time_decode(model, 256, args.frames)
                undo()
                print(f"{fmt:6s} round {r + 1} {'+'.join(sorted(v)) or 'unchanged':20s} {spf * 1e3:6.3f} ms/frame "
                      f"{1 / spf:7.1f} frames/s", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
