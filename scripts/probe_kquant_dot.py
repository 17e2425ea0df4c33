"""Probe: Q4_K / Q5_K's dp2a GEMV with the K-quant scale structure kept in integers (6-bit sub-block scales and mins
per 32 codes, one float scale and min scale per 256): each 32-code window's integer dot is multiplied by its
integer sub-scale and summed in int32 over a block, converted to float once per block; the mins' correction takes
the integer mins times float x sums. Against the landed kernel (float scale and min per 32 codes: q4_k on the
float path, q5_k on dp2a with a float conversion per window). S2's layer shapes, M = 1, graph-timed with rotating
weights; each variant checked against the reference.

    python scripts/probe_kquant_dot.py [--formats q4_k,q5_k]    (a CUDA GPU; TRITON_INTERPRET=1 on CPU: --small)
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from probe_variants import copies, device, per_layer, run_cases, split_outputs
from s2conv.runtime.kernels import INT_SPECS, REPACK, dequantize_packed, ops
from s2conv.runtime.kernels.layout import pack_int_codes
from s2conv.runtime.kernels.common import finish_split, store_output
from s2conv.runtime.kernels.triton_int import _bytes, _dp2, _load_slices, _x_absmax, _x_field, _xint

_W = tl.constexpr(16)
_R = tl.constexpr(16)
_BLOCK_K = tl.constexpr(512)


@triton.jit
def _mins_correction(x_row, m_rows, dm_rows, b, K):
    """sum over block b's 16 groups g of dmin[r, g // 8] * m[r, g] * (sum of x over g) -> fp32 [16] (rows r)."""
    g = tl.arange(0, 16)
    j = tl.arange(0, 32)
    xv = tl.load(x_row + b * _BLOCK_K + g[:, None] * 32 + j[None, :]).to(tl.float32)
    xsum = tl.sum(xv, axis=1)  # [16 groups]
    m = tl.load(m_rows[:, None] + b * 16 + g[None, :]).to(tl.float32)  # [16 rows, 16 groups]
    dm = tl.load(dm_rows[:, None] + b * 2 + g[None, :] // 8)
    return tl.sum(m * dm * xsum[None, :], axis=1)


@triton.jit
def kq_gemv_kernel(x_ptr, w_ptr, sc_ptr, m_ptr, d_ptr, dm_ptr, out_ptr, part_ptr, cnt_ptr, N, K, n_blocks,
                   blocks_per_split, n_split, stride_wg, stride_gn, stride_sn, stride_ps, BITS: tl.constexpr,
                   XMAX: tl.constexpr, PARTIAL: tl.constexpr, ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    amax = _x_absmax(x_ptr, K, b_start * _BLOCK_K, b_end * _BLOCK_K, True)
    inv = tl.where(amax > 1e-30, XMAX / amax, 0.0)
    WPB: tl.constexpr = 16 * BITS
    SPW: tl.constexpr = 32 // BITS  # fields per word: 8 (4-bit) or 4 (8-bit)
    NWIN: tl.constexpr = SPW // 2  # 32-code windows per word
    NT: tl.constexpr = WPB // _W
    BSTEP: tl.constexpr = WPB * _R
    row0 = pid_n * _R
    w_grp = w_ptr + pid_n.to(tl.int64) * stride_wg
    t1 = tl.arange(0, NT)
    w1 = tl.arange(0, _W)
    tt = t1[:, None, None]
    ww = w1[None, :, None]
    rr = tl.arange(0, _R)[None, None, :]
    rows = tl.minimum(row0 + rr, N - 1)
    x_col = x_ptr + t1[:, None] * (SPW * _W) + w1[None, :]
    kcol = t1[:, None] * (SPW * _W) + w1[None, :]
    sc_t = sc_ptr + rows * stride_gn + tt * NWIN  # window v of sub-tile t in block b: group b 16 + t NWIN + v
    d_t = d_ptr + rows * stride_sn + (tt * SPW * 16) // 256  # its 256-code super-block: b 2 + (t SPW 16) // 256
    w_tile = w_grp + (tt * _W + ww) * _R + rr
    acc = tl.zeros([NT, _W, _R], tl.float32)
    mcorr = tl.zeros([_R], tl.float32)
    rows1 = tl.minimum(row0 + tl.arange(0, _R), N - 1)
    (w0, h0, s00, s01, s02, s03, w1_, h1, s10, s11, s12, s13, w2, h2, s20, s21, s22, s23, w3, h3, s30, s31, s32,
     s33) = _load_slices(w_tile, w_tile, d_t, row0, rr, N, 0, b_start, b_end, BITS, 0, NT, _R, BSTEP, 1, 0, 1, 1)
    for b in range(b_start, b_end):
        (nw0, nh0, n00, n01, n02, n03, nw1, nh1, n10, n11, n12, n13, nw2, nh2, n20, n21, n22, n23, nw3, nh3, n30, n31,
         n32, n33) = _load_slices(w_tile, w_tile, d_t, row0, rr, N, 0, b + 1, b_end, BITS, 0, NT, _R, BSTEP, 1, 0,
                                  1, 1)
        kb = b * _BLOCK_K
        ai = tl.zeros([NT, _W, _R], tl.int32)
        for v in tl.static_range(NWIN):  # window v: fields 2v, 2v + 1 (one dp2a), one sub-scale
            xa = _x_field(x_col, x_col, kb + (2 * v) * _W, kcol, K, True, False)
            xb = _x_field(x_col, x_col, kb + (2 * v + 1) * _W, kcol, K, True, False)
            pair = ((_xint(xa, inv) & 0xFFFF) | (_xint(xb, inv) << 16))[:, :, None]
            dv = _dp2(pair, _bytes(w0, w0, v // 2, BITS), tl.zeros([NT, _W, _R], tl.int32), v % 2, ASM)
            sc = tl.load(sc_t + b * 16 + v).to(tl.int32)  # [NT, 1, 16]
            ai += dv * sc
        acc += ai.to(tl.float32) * tl.load(d_t + b * 2)
        mcorr += _mins_correction(x_ptr, m_ptr + rows1 * stride_gn, dm_ptr + rows1 * stride_sn, b, K)
        w0 = nw0
    y = tl.sum(tl.sum(acc, axis=1), axis=0) * (amax / XMAX) - mcorr
    offs_n = row0 + tl.arange(0, _R)
    n_mask = offs_n < N
    if PARTIAL:
        finish_split(y, y, offs_n, n_mask, part_ptr, pid_k, stride_ps, N, cnt_ptr + pid_n, n_split,
                     out_ptr + offs_n, out_ptr + offs_n, False, False)
    else:
        store_output(out_ptr + offs_n, y, n_mask, out_ptr + offs_n, False)


def kq_linear(x, q, kq, bits, split):
    """q: the codes in the interleaved layout (layout.pack_int_codes), whatever layout the format's REPACK uses."""
    sc, m, d, dm = kq
    n, k = sc.shape[0], x.shape[1]
    n_blocks = q.shape[1] // (16 * bits)
    per, split, y, part, cnt = split_outputs(n, n_blocks, split, x.dtype, x.device)
    # |sum of 4 windows' sc * dot| <= 4 * 63 * 2 * (2**bits - 1) * XMAX must stay in int32
    kq_gemv_kernel[(-(-n // 16), split)](x, q, sc, m, d, dm, y, part, cnt, n, k, n_blocks, per, split, 16 * q.shape[1],
                                         sc.stride(0), d.stride(0), part.stride(0), BITS=bits, XMAX=32767,
                                         PARTIAL=split > 1, ASM=x.device.type == "cuda", num_warps=4)
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4_k,q5_k")
    ap.add_argument("--small", action="store_true", help="small shapes (the interpreter's correctness check)")
    args = ap.parse_args()
    dev, shapes = device(args.small)
    g = torch.Generator(device=dev).manual_seed(0)
    failed = False
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        totals: dict[str, float] = {}
        for name, (n, k, split) in shapes.items():
            codes = torch.randint(0, spec.code_max + 1, (n, k), generator=g, dtype=torch.int16, device=dev)
            sc = torch.randint(0, 64, (n, k // 32), generator=g, device=dev).to(torch.uint8)
            m = torch.randint(0, 64, (n, k // 32), generator=g, device=dev).to(torch.uint8)
            d = (torch.rand((n, k // 256), generator=g, device=dev) * 1e-3).half().float()
            dm = (torch.rand((n, k // 256), generator=g, device=dev) * 1e-3).half().float()
            p = REPACK[fmt](codes, d.repeat_interleave(8, 1) * sc.float(), dm.repeat_interleave(8, 1) * m.float())
            x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
            ref = x.float() @ dequantize_packed(fmt, p, k).T
            kq = (sc, m, d, dm)
            q_inter = pack_int_codes(codes, spec.bits, spec.offset)
            wbytes = sum(t.numel() * t.element_size() for t in p.values())
            kbytes = q_inter.numel() * 4 + sum(t.numel() * t.element_size() for t in kq)
            packs = copies(wbytes, lambda: ({kk: t.clone() for kk, t in p.items()}, tuple(t.clone() for t in kq),
                                            q_inter.clone()))
            cases = {"landed": lambda pk: ops.int_linear_impl(x, pk[0]["qweight"], pk[0]["scales"], pk[0]["mins"],
                                                              spec.bits, spec.offset, spec.group, False)}
            for sp in sorted({split, 2 * split}):
                cases[f"kq k{sp}"] = lambda pk, sp=sp: kq_linear(x, pk[2], pk[1], spec.bits, sp)
            line, ok = run_cases(cases, (p, kq, q_inter), packs, ref, dev, totals)
            failed |= not ok
            print(f"{fmt:4s} {name:6s} {wbytes / 1e6:5.1f} MB (integer scales: {kbytes / 1e6:5.1f}) | {line}",
                  flush=True)
        per_layer(fmt, totals)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
