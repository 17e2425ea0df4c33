"""Probe: the dp2a integer GEMV fed x already quantized (int16 pairs in the order the loop reads them, one scale per
512-block, sums per 32 codes for the offset correction), as a norm kernel could write it, against the landed
kernel that quantizes x itself (a max |x| pass, then two loads, two multiplies and the packing per pair).
S2's layer shapes, M = 1, graph-timed with rotating weights; each variant checked against the reference.

    python scripts/probe_xquant.py [--formats q4,q2]     (a CUDA GPU; TRITON_INTERPRET=1 on CPU: --small)
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from probe_variants import copies, device, per_layer, run_cases, split_outputs
from s2conv.runtime.kernels import INT_SPECS, REPACK, dequantize_packed, ops
from s2conv.runtime.kernels.common import finish_split, store_output
from s2conv.runtime.kernels.triton_int import _bytes, _dp2, _load_slices, _window

_W = tl.constexpr(16)
_R = tl.constexpr(16)
_BLOCK_K = tl.constexpr(512)


def quantize_x(x: torch.Tensor, xmax: int):
    """x [K] (K a multiple of 512) -> (pairs int32 [K / 2]: entry 16 c + w holds q[32 c + w] in its low and
    q[32 c + 16 + w] in its high 16 bits; scales fp32 [K / 512]; sums int32 [K / 32] of q per 32 codes)."""
    xf = x.float().view(-1, 512)
    amax = xf.abs().amax(1)
    inv = torch.where(amax > 1e-30, xmax / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv[:, None]).to(torch.int32).view(-1, 2, 16)
    pairs = (q[:, 0] & 0xFFFF) | (q[:, 1] << 16)
    return pairs.reshape(-1).contiguous(), (amax / xmax).contiguous(), q.view(-1, 32).sum(1).to(torch.int32)


@triton.jit
def xq_gemv_kernel(xq_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, N, n_blocks,
                   blocks_per_split, n_split, stride_wg, stride_sn, stride_ps, BITS: tl.constexpr, OFF: tl.constexpr,
                   GROUP: tl.constexpr, SLICES: tl.constexpr, PARTIAL: tl.constexpr, ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    WPB: tl.constexpr = 16 * BITS
    SPW: tl.constexpr = 32 // BITS
    SPG: tl.constexpr = GROUP // _W
    NWIN: tl.constexpr = SPW // SPG if SPG < SPW else 1
    WL: tl.constexpr = SPW // NWIN
    GPB: tl.constexpr = _BLOCK_K // GROUP
    GPW: tl.constexpr = WL // SPG if WL >= SPG else 0
    NT: tl.constexpr = WPB // _W
    BSTEP: tl.constexpr = WPB * _R
    RS: tl.constexpr = _R // SLICES
    row0 = pid_n * _R
    w_grp = w_ptr + pid_n.to(tl.int64) * stride_wg
    t1 = tl.arange(0, NT)
    w1 = tl.arange(0, _W)
    tt = t1[:, None, None]
    ww = w1[None, :, None]
    rr = tl.arange(0, RS)[None, None, :]
    xq_col = xq_ptr + t1[:, None] * (SPW * 8) + w1[None, :]  # pair p of column (t, w): + kb / 2 + 16 p
    cc = tl.arange(0, WL // 2)
    xsum_t = xsum_ptr + t1[:, None] * (SPW // 2) + cc[None, :]  # window v of sub-tile t: + kb / 32 + v WL / 2
    g_t = (t1 * SPW) // SPG
    s_t = s_ptr + g_t[:, None, None]
    w_tile = w_grp + (tt * _W + ww) * _R + rr
    a0 = tl.zeros([NT, _W, RS], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    c0 = tl.zeros([NT, 1, RS], tl.float32)
    c1 = c0
    c2 = c0
    c3 = c0
    (w0, h0, s00, s01, s02, s03, w1_, h1, s10, s11, s12, s13, w2, h2, s20, s21, s22, s23, w3, h3, s30, s31, s32,
     s33) = _load_slices(w_tile, w_tile, s_t, row0, rr, N, stride_sn, b_start, b_end, BITS, GROUP, NT, RS, BSTEP,
                         GPB, GPW, NWIN, SLICES)
    for b in range(b_start, b_end):
        (nw0, nh0, n00, n01, n02, n03, nw1, nh1, n10, n11, n12, n13, nw2, nh2, n20, n21, n22, n23, nw3, nh3, n30, n31,
         n32, n33) = _load_slices(w_tile, w_tile, s_t, row0, rr, N, stride_sn, b + 1, b_end, BITS, GROUP, NT, RS,
                                  BSTEP, GPB, GPW, NWIN, SLICES)
        xs = tl.load(xs_ptr + b)
        for v in tl.static_range(NWIN):
            d0 = tl.zeros([NT, _W, RS], tl.int32)
            d1 = d0
            d2 = d0
            d3 = d0
            for p in tl.static_range(v * WL // 2, v * WL // 2 + WL // 2):
                pair = tl.load(xq_col + b * (_BLOCK_K // 2) + p * 16)[:, :, None]
                d0 = _dp2(pair, _bytes(w0, h0, p // 2, BITS), d0, p % 2, ASM)
                if SLICES == 4:
                    d1 = _dp2(pair, _bytes(w1_, h1, p // 2, BITS), d1, p % 2, ASM)
                    d2 = _dp2(pair, _bytes(w2, h2, p // 2, BITS), d2, p % 2, ASM)
                    d3 = _dp2(pair, _bytes(w3, h3, p // 2, BITS), d3, p % 2, ASM)
            qw = tl.sum(tl.load(xsum_t + b * (_BLOCK_K // 32) + v * (WL // 2)), axis=1).to(tl.float32)
            qw = qw[:, None, None]
            sv0 = _window(v, s00, s01, s02, s03) * xs
            a0 += ((d0 + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * sv0
            c0 += qw * sv0
            if SLICES == 4:
                sv1 = _window(v, s10, s11, s12, s13) * xs
                sv2 = _window(v, s20, s21, s22, s23) * xs
                sv3 = _window(v, s30, s31, s32, s33) * xs
                a1 += ((d1 + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * sv1
                a2 += ((d2 + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * sv2
                a3 += ((d3 + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * sv3
                c1 += qw * sv1
                c2 += qw * sv2
                c3 += qw * sv3
        w0, h0, s00, s01, s02, s03 = nw0, nh0, n00, n01, n02, n03
        w1_, h1, s10, s11, s12, s13 = nw1, nh1, n10, n11, n12, n13
        w2, h2, s20, s21, s22, s23 = nw2, nh2, n20, n21, n22, n23
        w3, h3, s30, s31, s32, s33 = nw3, nh3, n30, n31, n32, n33
    y = tl.sum(tl.sum(a0, axis=1), axis=0) - OFF * tl.sum(tl.sum(c0, axis=1), axis=0)
    if SLICES == 4:
        y1 = tl.sum(tl.sum(a1, axis=1), axis=0) - OFF * tl.sum(tl.sum(c1, axis=1), axis=0)
        y2 = tl.sum(tl.sum(a2, axis=1), axis=0) - OFF * tl.sum(tl.sum(c2, axis=1), axis=0)
        y3 = tl.sum(tl.sum(a3, axis=1), axis=0) - OFF * tl.sum(tl.sum(c3, axis=1), axis=0)
        y = tl.reshape(tl.permute(tl.join(tl.join(y, y1), tl.join(y2, y3)), (2, 1, 0)), (_R,))
    offs_n = row0 + tl.arange(0, _R)
    n_mask = offs_n < N
    if PARTIAL:
        finish_split(y, y, offs_n, n_mask, part_ptr, pid_k, stride_ps, N, cnt_ptr + pid_n, n_split,
                     out_ptr + offs_n, out_ptr + offs_n, False, False)
    else:
        store_output(out_ptr + offs_n, y, n_mask, out_ptr + offs_n, False)


def xq_linear(xqt, p, fmt, slices, split, dtype):
    spec = INT_SPECS[fmt]
    xq, xs, xsum = xqt
    q, s = p["qweight"], p["scales"]
    n = s.shape[0]
    n_blocks = q.shape[1] // (16 * spec.bits)
    per, split, y, part, cnt = split_outputs(n, n_blocks, split, dtype, q.device)
    xq_gemv_kernel[(-(-n // 16), split)](xq, xs, xsum, q, s, y, part, cnt, n, n_blocks, per, split, 16 * q.shape[1],
                                         s.stride(0), part.stride(0), BITS=spec.bits, OFF=spec.offset,
                                         GROUP=spec.group, SLICES=slices, PARTIAL=split > 1,
                                         ASM=q.device.type == "cuda", num_warps=4)
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4,q2")
    ap.add_argument("--small", action="store_true", help="small shapes (the interpreter's correctness check)")
    args = ap.parse_args()
    dev, shapes = device(args.small)
    g = torch.Generator(device=dev).manual_seed(0)
    failed = False
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        # the raw code sum of a window (codes + offset, unsigned) must stay under 2**22
        fields = 32 // spec.bits
        xmax = 2 ** min(15, ((2**22 - 1) // (min(spec.group // 16, fields) * (2**spec.bits - 1))).bit_length() - 1) - 1
        totals: dict[str, float] = {}
        for name, (n, k, split) in shapes.items():
            codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), generator=g, dtype=torch.int16,
                                  device=dev)
            scales = torch.rand((n, k // spec.group), generator=g, device=dev) * 0.01 + 0.001
            p = REPACK[fmt](codes, scales)
            x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
            xqt = quantize_x(x[0], xmax)
            ref = x.float() @ dequantize_packed(fmt, p, k).T
            wbytes = sum(t.numel() * t.element_size() for t in p.values())
            packs = copies(wbytes, lambda: {kk: t.clone() for kk, t in p.items()})
            cases = {"landed": lambda q: ops.int_linear_impl(x, q["qweight"], q["scales"], None, spec.bits,
                                                             spec.offset, spec.group, False)}
            for sl in ((1, 4) if spec.bits == 4 else (1,)):
                for sp in sorted({split, 2 * split}):
                    cases[f"xq s{sl} k{sp}"] = lambda q, sl=sl, sp=sp: xq_linear(xqt, q, fmt, sl, sp, x.dtype)
            line, ok = run_cases(cases, p, packs, ref, dev, totals)
            failed |= not ok
            print(f"{fmt:4s} {name:6s} {wbytes / 1e6:5.1f} MB | {line}", flush=True)
        per_layer(f"{fmt:4s} xmax {xmax}", totals)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
