"""Upper bounds for removing the frame's small launches: time the graph-replayed frame loop with chosen small
steps made free (their launch skipped, their output wrong), against the unchanged model in the same process.

  final     the final RMSNorms (slow and fast) return their input: what chaining them into the heads could save
  embed     the fast AR's codebook-embedding gathers return a fixed buffer (since `sampling.sample_embed`, only the
            first depth's, from the main token, is still a gather launch)
  first     each stack's first-block attention norm returns its input (float formats launch it)
  fast_attn the fast AR's decode attention (with its QK-norm, RoPE and cache write) returns a fixed buffer: what
            moving it into a GEMV's launch could save at most
  slow_attn the same for the slow AR's attention

Usage: python scripts/probe_launch_cuts.py [--formats q4,fp8] [--frames 100] [--rounds 2]
       [--cuts 'final;embed;first;fast_attn;slow_attn']   (a CUDA GPU)
Not a benchmark of anything that runs correctly: an estimate of what a change could gain at most.
"""
from __future__ import annotations

import argparse

import torch

from s2conv.bench import build_model, quantize_model, time_decode
from s2conv.schema import S2Config


class _Cut:
    """The fused kernel table with `rms_norm` returning its input (norm) and `rope_attention` a fixed buffer of its
    output's shape (attn)."""

    def __init__(self, kernels, norm: bool, attn: bool):
        self._k, self._norm, self._attn, self._out = kernels, norm, attn, {}

    def __getattr__(self, name):
        return getattr(self._k, name)

    def rms_norm(self, x, weight, eps):
        return x if self._norm else self._k.rms_norm(x, weight, eps)

    def rope_attention(self, qkv, qw, kw, freqs, k_cache, v_cache, pos, span, n_head, n_kv_head, eps, offsets=None):
        if not self._attn:
            return self._k.rope_attention(qkv, qw, kw, freqs, k_cache, v_cache, pos, span, n_head, n_kv_head, eps,
                                          offsets=offsets)
        shape = (*qkv.shape[:-1], n_head * k_cache.shape[-1])
        if shape not in self._out:
            self._out[shape] = torch.zeros(shape, dtype=qkv.dtype, device=qkv.device)
        return self._out[shape]


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
    for i, block in enumerate([*model.layers, *model.fast_layers]):
        first = block is model.layers[0] or block is model.fast_layers[0]
        attn = "fast_attn" in what if i >= len(model.layers) else "slow_attn" in what
        if (first and "first" in what) or attn:
            old = block._fused
            block._fused = _Cut(old, first and "first" in what, attn)
            undo.append(lambda b=block, k=old: setattr(b, "_fused", k))
    return lambda: [u() for u in reversed(undo)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4,fp8")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cuts", default="final;embed;first;final,embed,first",
                    help="variants, ';' between them, ',' between the cuts of one (the unchanged model runs too)")
    args = ap.parse_args()
    variants = [set()] + [set(v.split(",")) for v in args.cuts.split(";")]
    unknown = set().union(*variants) - {"final", "embed", "first", "fast_attn", "slow_attn"}
    if unknown:
        raise SystemExit(f"unknown cuts: {sorted(unknown)}")
    print(torch.cuda.get_device_name())
    cfg = S2Config()
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
