"""Time the decode attention launch (`fused.rope_attention`: qk-norm, RoPE, cache write and attention of one
position) at S2 Pro's shapes on one GPU: the fast AR's (10 cached positions) and the slow AR's (spans of 512 to 2048
keys, `--spans`, at two positions each), graph-replayed like a decode frame. Caches rotate so that L2 holds none of the slow keys. Each
shape is timed with the kernel of one program per query head and with the one of one program per KV head
(`fused.ATTN_GQA_SPAN`).

Usage: python scripts/probe_attention.py [--calls 64]
Run it from two checkouts (PYTHONPATH) to compare kernels: it prints microseconds per launch.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from s2conv.runtime.kernels import fused
from s2conv.runtime.kernels.ops import graph_time_ms
from s2conv.runtime.rope import precompute_freqs_cis
from s2conv.schema import S2Config


def time_attention(n_head: int, n_kv: int, d: int, qk_norm: bool, cache_len: int, span: int, pos: int,
                   calls: int) -> float:
    """Microseconds per rope_attention launch at one shape; caches rotate over ~200 MB."""
    dev = "cuda"
    qkv = torch.randn(1, 1, (n_head + 2 * n_kv) * d, device=dev, dtype=torch.bfloat16)
    w = torch.rand(d, device=dev, dtype=torch.bfloat16) + 0.5 if qk_norm else None
    freqs = precompute_freqs_cis(cache_len, d, 1e6).to(dev)[pos: pos + 1]
    pos_t = torch.tensor([pos], device=dev)
    per = 2 * n_kv * cache_len * d * 2
    caches = [(torch.randn(1, n_kv, cache_len, d, device=dev, dtype=torch.bfloat16),
               torch.randn(1, n_kv, cache_len, d, device=dev, dtype=torch.bfloat16))
              for _ in range(max(2, min(64, int(200e6 // per))))]
    it = itertools.cycle(caches)

    def call():
        kc, vc = next(it)
        return fused.rope_attention(qkv, w, w, freqs, kc, vc, pos_t, span, n_head, n_kv, 1e-6)

    return graph_time_ms(call, calls=calls) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=64, help="launches per captured graph")
    ap.add_argument("--block-n", type=int, help="keys per loop step, at most (default: fused.ATTN_BLOCK_N)")
    ap.add_argument("--warps", type=int, help="warps per program (default: fused.ATTN_WARPS)")
    ap.add_argument("--reduce-warps", type=int, help="warps per program of the split reduction")
    ap.add_argument("--spans", type=int, nargs="+", default=[512, 1024, 1536, 2048], help="slow AR attention spans")
    ap.add_argument("--gqa", type=int, nargs=3, metavar=("BLOCK_N", "WARPS", "PER_SM"),
                    help="the per-KV-head kernel's keys per step, warps and programs per SM")
    args = ap.parse_args()
    if args.gqa:
        fused.ATTN_GQA_BLOCK_N, fused.ATTN_GQA_WARPS, fused.ATTN_GQA_PER_SM = args.gqa
    if args.block_n:
        fused.ATTN_BLOCK_N = args.block_n
    if args.warps:
        fused.ATTN_WARPS = args.warps
    if args.reduce_warps:
        fused.ATTN_REDUCE_WARPS = args.reduce_warps
    cfg = S2Config()
    print(torch.cuda.get_device_name())
    kernels = {"per query head": 1 << 30, "per KV head": 0}  # fused.ATTN_GQA_SPAN
    for depth in (1, 5, 9):
        for name, gqa in kernels.items():
            fused.ATTN_GQA_SPAN = gqa
            us = time_attention(cfg.fast_n_head, cfg.fast_n_local_heads, cfg.fast_head_dim,
                                cfg.fast_attention_qk_norm, cfg.num_codebooks, cfg.num_codebooks, depth, args.calls)
            print(f"fast AR, depth {depth}, {name}: {us:6.2f} us per launch")
    for span in args.spans:
        for pos in (span // 2, span - 1):
            for name, gqa in kernels.items():
                fused.ATTN_GQA_SPAN = gqa
                us = time_attention(cfg.n_head, cfg.n_local_heads, cfg.head_dim, cfg.attention_qk_norm, span, span,
                                    pos, args.calls)
                print(f"slow AR, position {pos} of a {span}-key span, {name}: {us:6.2f} us per launch")


if __name__ == "__main__":
    main()
