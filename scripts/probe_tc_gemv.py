"""Probe: a q4 (g128) GEMV on tensor cores over the runtime's packed integer layout, against the landed CUDA-core
kernel (`ops.int_linear_impl`) at S2's four layer shapes, M = 1, graph-timed with rotating weights.

Dequantization: fields f and f + 2 of a word sit at bits s and s + 16 (s = 4 i, f = 0, 4, 1, 5: layout.field_bit);
(word >> s) & 0x000F000F | 0x43004300 turns them
into the bf16 pair (128 + u_i, 128 + u_{i+4}) with one shift and one LOP3 (no conversions), and the code offset
comes back per group as -136 sum(x), so sum_k s (u - 8) x = s (dot(128 + u, x) - 136 sum(x)). `tl.dot` multiplies
those pairs with x broadcast to NB columns. bench/RESULTS.md (fourth session) has the outcome: fewer instructions
per code, slower kernels (one shared-memory round trip, barrier and wait per dot). Kept to measure the next idea.

    python scripts/probe_tc_gemv.py            (a CUDA GPU; the correctness check also runs under TRITON_INTERPRET=1)
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def tc_q4_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, n_blocks, blocks_per_prog, stride_wg, stride_sn,
                 TILE_G: tl.constexpr, NB: tl.constexpr, IEEE: tl.constexpr):
    """out[n] += sum_k w[n, k] x[k] over this program's blocks; grid (N / (16 TILE_G), cdiv(n_blocks, per prog))."""
    RT: tl.constexpr = 16 * TILE_G  # rows per program: TILE_G interleaved 16-row groups
    rows = tl.program_id(0) * RT + tl.arange(0, RT)
    r = rows % 16
    w = tl.arange(0, 16)
    base = w_ptr + (rows // 16)[:, None].to(tl.int64) * stride_wg + w[None, :] * 16 + r[:, None]  # [RT, 16 words]
    jj = tl.arange(0, 2)
    acc = tl.zeros([RT, NB], tl.float32)
    b_start = tl.program_id(1) * blocks_per_prog
    for b in range(b_start, tl.minimum(b_start + blocks_per_prog, n_blocks)):
        for t in tl.static_range(4):  # sub-tile t = scale group t of the block (k in [128 t, 128 t + 128))
            words = tl.load(base + b * 1024 + t * 256)
            xg = x_ptr + b * 512 + t * 128
            acc_t = tl.zeros([RT, NB], tl.float32)
            for i in tl.static_range(4):  # shift 4 i: fields f + 2 j (f = 0, 4, 1, 5: layout.field_bit) of word w
                pair = ((words >> (4 * i)) & 0x000F000F) | 0x43004300
                lo = (pair & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
                hi = (pair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
                a = tl.join(lo, hi).reshape(RT, 32)
                xo = (16 * ((i % 2) * 4 + i // 2 + 2 * jj[None, :]) + w[:, None]).reshape(32)  # x of those fields
                xb = tl.load(xg + xo[:, None] + 0 * tl.arange(0, NB)[None, :])  # [32, NB], every column x
                if IEEE:  # the interpreter's bf16 dot is wrong: multiply in fp32 there
                    acc_t = tl.dot(a.to(tl.float32), xb.to(tl.float32), acc_t, input_precision="ieee")
                else:
                    acc_t = tl.dot(a, xb, acc_t)
            xsum = tl.sum(tl.load(xg + tl.arange(0, 128)).to(tl.float32), axis=0)
            s = tl.load(s_ptr + tl.minimum(rows, N - 1) * stride_sn + b * 4 + t)
            acc += (acc_t - 136.0 * xsum) * s[:, None]
    tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1) * (1.0 / NB), mask=rows < N)


def tc_q4(x, qweight, scales, n, out, tile_g=1, blocks_per_prog=1, num_warps=1, nb=8):
    """out (fp32 [N], zeroed by the caller) += x [1, K] @ W^T; N a multiple of 16 tile_g."""
    n_blocks = qweight.shape[1] // 64
    grid = (triton.cdiv(n, 16 * tile_g), triton.cdiv(n_blocks, blocks_per_prog))
    tc_q4_kernel[grid](x, qweight, scales, out, n, x.shape[1], n_blocks, blocks_per_prog, 16 * qweight.shape[1],
                       scales.stride(0), TILE_G=tile_g, NB=nb, IEEE=os.environ.get("TRITON_INTERPRET") == "1",
                       num_warps=num_warps)
    return out


def main() -> int:
    from s2conv.runtime.kernels import ops
    from s2conv.runtime.kernels.layout import repack_int

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {"wqkv": (6144, 2560), "wo": (2560, 4096), "w1|w3": (19456, 2560), "w2": (2560, 9728)}
    if dev == "cpu":  # correctness only, under the interpreter
        shapes = {"small": (64, 1024)}
    variants = [dict(tile_g=tg, num_warps=wp, blocks_per_prog=bpp) for tg, wp in ((1, 1), (2, 1), (4, 2), (4, 4), (8, 4))
                for bpp in (1, 2)]
    print("device:", torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)")
    g = torch.Generator(device=dev).manual_seed(0)
    totals, failed = {"current": 0.0, "best tensor-core": 0.0}, False
    for name, (n, k) in shapes.items():
        codes = torch.randint(-7, 8, (n, k), device=dev, generator=g, dtype=torch.int16)
        scales = torch.rand(n, k // 128, device=dev, generator=g) * 0.01 + 0.001
        p = repack_int("q4", codes, scales)
        x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
        ref = (x.float() @ (codes.float() * scales.repeat_interleave(128, dim=1)).T)[0]
        rel = lambda y: ((y.float() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
        if dev == "cpu":
            for v in variants[:2]:
                err = rel(tc_q4(x, p["qweight"], p["scales"], n, torch.zeros(n), **v))
                print(f"{name} {v}: max error {err:.1e}")
                failed |= err > 1e-3
            continue
        wbytes = 4 * (p["qweight"].numel() + p["scales"].numel())
        copies = max(2, int(120e6 // wbytes) + 1)  # rotate so that L2 holds none of them
        packs = [(p["qweight"].clone(), p["scales"].clone()) for _ in range(copies)]
        it = itertools.count()
        cur = lambda: ops.int_linear_impl(x, *packs[next(it) % copies], None, 4, 8, 128, False)  # noqa: E731
        us = ops.graph_time_ms(cur, calls=2 * copies, reps=10) * 1e3
        totals["current"] += us
        print(f"{name} [{n}x{k}] {wbytes / 1e6:.1f} MB, floor at 3.0 TB/s {wbytes / 3e6:.1f} us: current {us:.1f} us")
        out, best = torch.zeros(n, device=dev), float("inf")
        for v in variants:
            err = rel(tc_q4(x, p["qweight"], p["scales"], n, torch.zeros(n, device=dev), **v))
            us = ops.graph_time_ms(lambda: tc_q4(x, *packs[next(it) % copies], n, out, **v), calls=2 * copies,
                                   reps=10) * 1e3
            print(f"   tensor cores {v}: {us:.1f} us, max error {err:.1e}")
            failed |= err > 1e-3
            best = min(best, us)
        totals["best tensor-core"] += best
    if dev == "cuda":
        print("per layer: " + ", ".join(f"{k} {v:.1f} us" for k, v in totals.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
