"""Triton kernels for the integer formats in the layout of `layout.py` (slot-planar blocks, 16 interleaved rows):
GEMV (M = 1), small-M GEMM. The formats that layout holds now: 2-, 3- and 4-bit codes without mins in scale groups
of 32 codes or more (q4, q4_0, q3, q2, tq2_0); 8-bit codes are read row-major (`triton_float`), and 2- and 4-bit
codes in shorter groups or with mins by the tensor-core kernel (`triton_mma`).

Dequantization without integer-to-float conversions (the H100 converts 16 ints per SM and clock, 8x slower than
it multiplies): OR-ing a bit field v < 2**23 into the mantissa of 2.0**23 gives the float 2**23 + v exactly, and
one subtraction gives the code. A field at bit position p is read in place as v = u * 2**p (no shift) and the x
it meets is pre-scaled by 2**-p, once for the 4 weight rows a thread holds (layout.py interleaves rows so that one
16-byte load brings the same word of 4 rows). Both scalings are powers of two, so products equal the reference
dequantize-then-multiply in fp32.

The GEMV's second path (`_int_rows_gemv_idp`, bf16/fp16 x, the default for most formats) multiplies in integers
instead: x scaled to 16-bit integers, four codes per shift-and-mask as bytes, two multiply-adds per dp2a.
"""
from __future__ import annotations

import triton
import triton.language as tl
from s2conv.runtime.kernels.common import finish_split, pdl_start, rs_scale, store_output, zero_once

_BLOCK_K = tl.constexpr(512)  # codes per block (layout.BLOCK_K)
_W = tl.constexpr(16)  # int32 words per sub-tile row (layout.WORDS)
_R = tl.constexpr(16)  # interleaved rows per group (layout.ROWS)


@triton.jit
def _field(t, t_hi, magic, P: tl.constexpr, NB: tl.constexpr, OFF: tl.constexpr):
    """(field - OFF) * 2**Q in fp32 for the NB-bit field at bit P of the int32 words t (t_hi = t >> 16).

    Exact: the field is read in place as the float 2**23 + field * 2**Q (one LOP3) and one subtraction removes
    2**23 + OFF * 2**Q; Q = P, or P - 16 for fields ending above bit 22 (read from t_hi). The x it meets must be
    scaled by 2**-Q (`_xq`). magic = 0x4B000000 arrives as a kernel argument so that the compiler keeps it in a
    register instead of re-materializing the constant per weight.
    """
    if P + NB > 23:
        f = ((t_hi & (((1 << NB) - 1) << (P - 16))) | magic).to(tl.float32, bitcast=True)
        return f - (8388608.0 + OFF * (1 << (P - 16)))
    else:
        f = ((t & (((1 << NB) - 1) << P)) | magic).to(tl.float32, bitcast=True)
        return f - (8388608.0 + OFF * (1 << P))


@triton.jit
def _xq(xv, P: tl.constexpr, NB: tl.constexpr, XMUL: tl.constexpr):
    """x * XMUL * 2**-Q for the field read by `_field(.., P, NB, ..)` (a power of two: products stay exact)."""
    if P + NB > 23:
        return xv * (XMUL / (1 << (P - 16)))
    else:
        return xv * (XMUL / (1 << P))


@triton.jit
def _load_scales(s_tile, g, valid, GPW: tl.constexpr, NWIN: tl.constexpr):
    """The scale tiles of the (up to 4) windows of one block: window v reads group g + v * GPW of each column."""
    s0 = tl.load(s_tile + g, mask=valid, other=0.0).to(tl.float32)  # fp32 or fp16 scales (`layout.repack_int`)
    s1 = s0
    s2 = s0
    s3 = s0
    if NWIN > 1:
        s1 = tl.load(s_tile + g + GPW, mask=valid, other=0.0).to(tl.float32)
    if NWIN > 2:
        s2 = tl.load(s_tile + g + 2 * GPW, mask=valid, other=0.0).to(tl.float32)
        s3 = tl.load(s_tile + g + 3 * GPW, mask=valid, other=0.0).to(tl.float32)
    return s0, s1, s2, s3


@triton.jit
def _window(v: tl.constexpr, a0, a1, a2, a3):
    """The scale (or min) tile of window v (compile time) of a block."""
    if v == 0:
        return a0
    elif v == 1:
        return a1
    elif v == 2:
        return a2
    else:
        return a3


@triton.jit
def _load_block(w_tile, h_tile, s_tile, b, b_end, BITS: tl.constexpr, GROUP: tl.constexpr, NT: tl.constexpr,
                BSTEP: tl.constexpr, GPB: tl.constexpr, GPW: tl.constexpr, NWIN: tl.constexpr):
    """Block b's weight tile [NT, 16, 16] (and 3-bit high-bit tile, else the same tile again) and its window
    scales [NT, 1, 16]; everything masked off when b >= b_end."""
    return _load_slice(w_tile, h_tile, s_tile, b, b_end, BITS, GROUP, NT, _R, BSTEP, GPB, GPW, NWIN)


@triton.jit
def _int_rows_gemv(x_row, w_grp, s_rows, K, b_start, b_end, magic,
                   BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                   BPP: tl.constexpr):
    """sum_k w[n, k] * x[k] over blocks [b_start, b_end) (at most BPP of them) for one group of 16 interleaved rows
    -> fp32 [16].

    w_grp: the group's first word; s_rows: [16] pointers to each row's scales. A whole block of the
    group (16 * BITS words of 16 rows) is one contiguous tile [NT, 16, 16] = (sub-tile t, word w, row r): field i
    of the tile holds slots t * SPW + i of every sub-tile at once and meets x at k = 16 * (t * SPW + i) + w, the
    same x for all 16 rows (so a thread converts and scales each x once for the 4 rows of its 16-byte load). Scales
    apply per window of WL fields, inside which every column stays in one group. 3-bit: the tile is the two
    low-bit sub-tiles ([2, 16, 16]); the high-bit sub-tile is read into a second tile whose (t, w) entry holds
    word w shifted right by 4 t, so that field i (bit 8 * (i % 4) + i // 4, layout.field_bit) is the high bit of
    slot t * 16 + i.
    """
    WPB: tl.constexpr = 16 * BITS  # words per block and row
    TW: tl.constexpr = 32 if BITS == 3 else WPB  # tile width (words per row)
    SPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # fields per word
    SPG: tl.constexpr = GROUP // _W  # slots per scale group
    NWIN: tl.constexpr = SPW // SPG if SPG < SPW else 1  # scale windows per block
    WL: tl.constexpr = SPW // NWIN  # fields per window
    GPB: tl.constexpr = _BLOCK_K // GROUP  # groups per block
    GPW: tl.constexpr = WL // SPG if WL >= SPG else 0  # groups from one window to the next
    NT: tl.constexpr = TW // _W  # sub-tiles in the tile
    BSTEP: tl.constexpr = WPB * _R  # int32 words from one block of the group to the next
    t1 = tl.arange(0, NT)
    w1 = tl.arange(0, _W)
    tt = t1[:, None, None]
    ww = w1[None, :, None]
    rr = tl.arange(0, _R)[None, None, :]
    x_col = x_row + t1[:, None] * (SPW * _W) + w1[None, :]  # [NT, 16]: x of field 0 of every column (block 0)
    w_tile = w_grp + (tt * _W + ww) * _R + rr  # [NT, 16, 16], contiguous
    g_t = (t1 * SPW) // SPG  # group of window 0 within the block, per sub-tile
    # one scale per (sub-tile, row) [NT, 1, 16], broadcast over the 16 words
    s_tile = s_rows[None, None, :] + g_t[:, None, None]
    if BITS == 3:
        h_tile = w_grp + (32 + ww + tt * 0) * _R + rr  # word 32 + w: the high-bit sub-tile
        h_shift = tt * 4 + ww * 0 + rr * 0
    else:
        h_tile = w_tile
    acc = tl.zeros([NT, _W, _R], tl.float32)
    # BPP > 1: BPP blocks unrolled per step (masked past b_end): straight-line code lets the compiler issue all their
    # weight, scale and x loads early instead of one memory round trip per block (ops.py: BPP = all of a program's
    # blocks). BPP = 1: block b + 1 is loaded while block b computes (register double buffering).
    if BPP == 1:
        wt, ht, s0, s1, s2, s3 = _load_block(w_tile, h_tile, s_tile, b_start, b_end, BITS, GROUP, NT, BSTEP, GPB,
                                             GPW, NWIN)
    for b0 in range(b_start, b_end, BPP):
        for j in tl.static_range(BPP):
            b = b0 + j
            if BPP == 1:
                wn, hn, n0, n1, n2, n3 = _load_block(w_tile, h_tile, s_tile, b + 1, b_end, BITS, GROUP, NT, BSTEP,
                                                     GPB, GPW, NWIN)
            else:
                wt, ht, s0, s1, s2, s3 = _load_block(w_tile, h_tile, s_tile, b, b_end, BITS, GROUP, NT, BSTEP, GPB,
                                                     GPW, NWIN)
            wt_hi = wt >> 16
            if BITS == 3:
                ht = ht >> h_shift
                ht_hi = ht >> 16
            kb = b * _BLOCK_K
            x_live = (tl.full([NT, _W], b, tl.int32) < b_end) & (kb + t1[:, None] * (SPW * _W) + w1[None, :] < K)
            for v in tl.static_range(NWIN):
                acc_g = tl.zeros([NT, _W, _R], tl.float32)
                for i in tl.static_range(v * WL, v * WL + WL):  # compile-time field index (no assignment:
                    # triton 3.6 turns an assigned int into a runtime value)
                    if EVEN_K:
                        xv = tl.load(x_col + kb + i * _W, mask=x_live, other=0.0).to(tl.float32)
                    else:
                        xv = tl.load(x_col + kb + i * _W, mask=x_live & (kb + t1[:, None] * (SPW * _W) + w1[None, :]
                                                                         + i * _W < K), other=0.0).to(tl.float32)
                    if BITS == 3:  # u = low2 + 4 * high1; the offset goes with the low field
                        # field i at bit 8 (i % 4) + bits (i // 4) (layout.field_bit; inline: constexpr in triton 3.6)
                        acc_g += (_field(wt, wt_hi, magic, 8 * (i % 4) + 2 * (i // 4), 2, OFF)
                                  * _xq(xv, 8 * (i % 4) + 2 * (i // 4), 2, 1.0)[:, :, None])
                        acc_g += (_field(ht, ht_hi, magic, 8 * (i % 4) + i // 4, 1, 0)
                                  * _xq(xv, 8 * (i % 4) + i // 4, 1, 4.0)[:, :, None])
                    else:
                        xq = _xq(xv, 8 * (i % 4) + BITS * (i // 4), BITS, 1.0)
                        acc_g += _field(wt, wt_hi, magic, 8 * (i % 4) + BITS * (i // 4), BITS, OFF) * xq[:, :, None]
                acc += acc_g * _window(v, s0, s1, s2, s3)
            if BPP == 1:
                wt, ht, s0, s1, s2, s3 = wn, hn, n0, n1, n2, n3
    return tl.sum(tl.sum(acc, axis=1), axis=0)


# ---- integer-dot GEMV (bf16/fp16 x): x quantized to 16-bit integers, codes multiplied two per dp2a ----------------
@triton.jit
def _dp2(a, b, c, HALF: tl.constexpr, ASM: tl.constexpr):
    """c + a.lo16 * b.byte(2 HALF) + a.hi16 * b.byte(2 HALF + 1): PTX dp2a (a two signed 16-bit halves, b four
    unsigned bytes), one instruction for two multiply-adds; ASM=False computes the same with plain integer ops (the
    triton interpreter runs no PTX)."""
    if ASM:
        if HALF == 0:
            return tl.inline_asm_elementwise("dp2a.lo.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp2a.hi.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        bh = b >> (16 * HALF)
        return c + ((a << 16) >> 16) * (bh & 0xFF) + (a >> 16) * ((bh >> 8) & 0xFF)


@triton.jit
def _bytes(wt, ht, e: tl.constexpr, BITS: tl.constexpr):
    """Fields 4e .. 4e + 3 of the words as their four unsigned bytes (layout.field_bit); 3-bit: the low 2 bits
    from wt, the high bit from ht (already shifted to its sub-tile)."""
    if BITS == 3:
        return ((wt >> (2 * e)) & 0x03030303) | (((ht >> e) & 0x01010101) << 2)
    else:
        return (wt >> (BITS * e)) & (((1 << BITS) - 1) * 0x01010101)


@triton.jit
def _x_field(x_col, g_col, k0, kcol, K, EVEN_K: tl.constexpr, NORM: tl.constexpr):
    """x (times the norm weight g with NORM) at k0 + kcol [NT, 16], in fp32."""
    if EVEN_K:
        xv = tl.load(x_col + k0).to(tl.float32)
        if NORM:
            xv = xv * tl.load(g_col + k0).to(tl.float32)
    else:
        xv = tl.load(x_col + k0, mask=k0 + kcol < K, other=0.0).to(tl.float32)
        if NORM:
            xv = xv * tl.load(g_col + k0, mask=k0 + kcol < K, other=0.0).to(tl.float32)
    return xv


@triton.jit
def _xint(xv, inv):
    """The int32 0x4B400000 + round(x * inv) (|x * inv| < 2**22): its low 16 bits are round(x * inv) as int16."""
    return (xv * inv + 12582912.0).to(tl.int32, bitcast=True)


@triton.jit
def _x_absmax(x_row, K, k_start, k_end, EVEN_K: tl.constexpr):
    """max |x[k]| over k in [k_start, min(k_end, K))."""
    offs = tl.arange(0, _BLOCK_K)
    m = tl.zeros([_BLOCK_K], tl.float32)
    for k0 in range(k_start, k_end, _BLOCK_K):
        if EVEN_K:
            xv = tl.load(x_row + k0 + offs)
        else:
            xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0)
        m = tl.maximum(m, tl.abs(xv.to(tl.float32)))
    return tl.max(m, axis=0)


@triton.jit
def _x_norm_stats(x_row, g_ptr, K, EVEN_K: tl.constexpr):
    """(sum_k x[k]**2, max_k |x[k] g[k]|) over the whole row: an RMSNorm folded into the GEMV reads its input
    x and multiplies by g (the norm weight) on the fly; the per-row rsqrt scales the output instead."""
    offs = tl.arange(0, _BLOCK_K)
    ss = tl.zeros([_BLOCK_K], tl.float32)
    m = tl.zeros([_BLOCK_K], tl.float32)
    for k0 in range(0, K, _BLOCK_K):
        if EVEN_K:
            xv = tl.load(x_row + k0 + offs).to(tl.float32)
            gv = tl.load(g_ptr + k0 + offs).to(tl.float32)
        else:
            xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            gv = tl.load(g_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        ss += xv * xv
        m = tl.maximum(m, tl.abs(xv * gv))
    return tl.sum(ss, axis=0), tl.max(m, axis=0)


@triton.jit
def _load_slice(w_tile, h_tile, s_tile, b, b_end, BITS: tl.constexpr, GROUP: tl.constexpr, NT: tl.constexpr,
                RS: tl.constexpr, BSTEP: tl.constexpr, GPB: tl.constexpr, GPW: tl.constexpr, NWIN: tl.constexpr):
    """Block b's tiles for a slice of RS of the group's 16 rows: weight words [NT, 16, RS] (and the 3-bit high-bit
    tile, else the same tile again), window scales [NT, 1, RS]; everything masked off
    when b >= b_end."""
    live = tl.full([NT, _W, RS], b, tl.int32) < b_end  # tile-shaped masks (scalar ones are not portable)
    live_s = tl.full([NT, 1, RS], b, tl.int32) < b_end
    wt = tl.load(w_tile + b * BSTEP, mask=live, other=0)
    ht = wt
    if BITS == 3:
        ht = tl.load(h_tile + b * BSTEP, mask=live, other=0)
    s0, s1, s2, s3 = _load_scales(s_tile, b * GPB, live_s, GPW, NWIN)
    return wt, ht, s0, s1, s2, s3


@triton.jit
def _load_slices(w_tile, h_tile, s_t, row0, rr, N, stride_sn, b, b_end, BITS: tl.constexpr, GROUP: tl.constexpr,
                 NT: tl.constexpr, RS: tl.constexpr, BSTEP: tl.constexpr, GPB: tl.constexpr, GPW: tl.constexpr,
                 NWIN: tl.constexpr, SLICES: tl.constexpr):
    """`_load_slice` of each of the SLICES slices (rows s RS .. s RS + RS - 1, scale rows clamped to N - 1);
    SLICES = 1 repeats slice 0 for the unused three."""
    w0, h0, s00, s01, s02, s03 = _load_slice(w_tile, h_tile, s_t + tl.minimum(row0 + rr, N - 1) * stride_sn, b,
                                             b_end, BITS, GROUP, NT, RS, BSTEP, GPB, GPW, NWIN)
    w1, h1, s10, s11, s12, s13 = w0, h0, s00, s01, s02, s03
    w2, h2, s20, s21, s22, s23 = w0, h0, s00, s01, s02, s03
    w3, h3, s30, s31, s32, s33 = w0, h0, s00, s01, s02, s03
    if SLICES == 4:
        w1, h1, s10, s11, s12, s13 = _load_slice(w_tile + RS, h_tile + RS,
                                                 s_t + tl.minimum(row0 + RS + rr, N - 1) * stride_sn, b, b_end, BITS,
                                                 GROUP, NT, RS, BSTEP, GPB, GPW, NWIN)
        w2, h2, s20, s21, s22, s23 = _load_slice(w_tile + 2 * RS, h_tile + 2 * RS,
                                                 s_t + tl.minimum(row0 + 2 * RS + rr, N - 1) * stride_sn, b, b_end,
                                                 BITS, GROUP, NT, RS, BSTEP, GPB, GPW, NWIN)
        w3, h3, s30, s31, s32, s33 = _load_slice(w_tile + 3 * RS, h_tile + 3 * RS,
                                                 s_t + tl.minimum(row0 + 3 * RS + rr, N - 1) * stride_sn, b, b_end,
                                                 BITS, GROUP, NT, RS, BSTEP, GPB, GPW, NWIN)
    return (w0, h0, s00, s01, s02, s03, w1, h1, s10, s11, s12, s13, w2, h2, s20, s21, s22, s23, w3, h3, s30, s31, s32,
            s33)


@triton.jit
def _window_sum(a, corr, acc, s):
    """Add one window's integer dot a (+ corr, its offset correction) to the running sum acc, scaled by the
    window's scale s (converted exactly through the 0x4B400000 bias that corr carries)."""
    return acc + ((a + corr).to(tl.float32, bitcast=True) - 12582912.0) * s


@triton.jit
def _idp_block(x_col, g_col, kcol, K, kb, inv, w0, h0, s00, s01, s02, s03, w1_, h1, s10, s11, s12, s13, w2, h2, s20,
               s21, s22, s23, w3, h3, s30, s31, s32, s33, a0, a1, a2, a3, h_shift, BITS: tl.constexpr,
               OFF: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr, SLICES: tl.constexpr, ASM: tl.constexpr,
               NORM: tl.constexpr):
    """One block of `_int_rows_gemv_idp`: its tiles (words, 3-bit high-bit tiles, window scales of each slice)
    met with x at columns kb + ..., added to the accumulators a0 .. a3 (returned)."""
    SPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    SPG: tl.constexpr = GROUP // _W
    NWIN: tl.constexpr = SPW // SPG if SPG < SPW else 1
    WL: tl.constexpr = SPW // NWIN
    NT: tl.constexpr = (32 if BITS == 3 else 16 * BITS) // _W
    RS: tl.constexpr = _R // SLICES
    # 0x4B400000 = the bits of 2**23 + 2**22, a float that holds 2**23 + 2**22 + i exactly for |i| < 2**22: the bias
    # of a window's sum, and the -OFF * (count * bias) that a sum of `_xint` values carries, wrapped to int32
    CORR0: tl.constexpr = (0x4B400000 * (1 + OFF * WL) + 2**31) % 2**32 - 2**31
    if BITS == 3:
        h0 = h0 >> h_shift
        if SLICES == 4:
            h1 = h1 >> h_shift
            h2 = h2 >> h_shift
            h3 = h3 >> h_shift
    for v in tl.static_range(NWIN):
        qsum = tl.zeros([NT, _W], tl.int32)
        d0 = tl.zeros([NT, _W, RS], tl.int32)
        d1 = d0
        d2 = d0
        d3 = d0
        for p in tl.static_range(v * WL // 2, v * WL // 2 + WL // 2):  # x pair p: fields 2p, 2p + 1
            xa = _x_field(x_col, g_col, kb + (2 * p) * _W, kcol, K, EVEN_K, NORM)
            xb = _x_field(x_col, g_col, kb + (2 * p + 1) * _W, kcol, K, EVEN_K, NORM)
            qa = _xint(xa, inv)
            qb = _xint(xb, inv)
            qsum += qa + qb
            pair = ((qa & 0xFFFF) | (qb << 16))[:, :, None]
            d0 = _dp2(pair, _bytes(w0, h0, p // 2, BITS), d0, p % 2, ASM)
            if SLICES == 4:
                d1 = _dp2(pair, _bytes(w1_, h1, p // 2, BITS), d1, p % 2, ASM)
                d2 = _dp2(pair, _bytes(w2, h2, p // 2, BITS), d2, p % 2, ASM)
                d3 = _dp2(pair, _bytes(w3, h3, p // 2, BITS), d3, p % 2, ASM)
        corr = (qsum * (-OFF) + CORR0)[:, :, None]
        a0 = _window_sum(d0, corr, a0, _window(v, s00, s01, s02, s03))
        if SLICES == 4:
            a1 = _window_sum(d1, corr, a1, _window(v, s10, s11, s12, s13))
            a2 = _window_sum(d2, corr, a2, _window(v, s20, s21, s22, s23))
            a3 = _window_sum(d3, corr, a3, _window(v, s30, s31, s32, s33))
    return a0, a1, a2, a3


@triton.jit
def _int_rows_gemv_idp(x_row, g_ptr, w_grp, s_row0, stride_sn, row0, N, K, b_start, b_end, inv,
                       BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                       SLICES: tl.constexpr, ASM: tl.constexpr, NORM: tl.constexpr, UNROLL: tl.constexpr = 1):
    """sum_k (code[n, k] * scale) * xi[k] over blocks [b_start, b_end) for one group of 16 interleaved rows, with
    xi = round(x * inv) the 16-bit integer x -> fp32 [16] (the caller multiplies by 1 / inv). NORM: x[k] * g[k]
    in place of x[k] (g: an RMSNorm's weight, fp32 product of the two).

    Same tiles as `_int_rows_gemv`, cut into SLICES slices of 16 / SLICES rows, so that a thread holding one
    16-byte word vector of every slice (SLICES = 4) shares each x conversion among 16 rows instead of 4. Per word,
    (w >> bits * e) & byte_mask gives 4 consecutive fields as bytes and two dp2a multiply them with two pairs of
    x integers. Integer sums per window (the scale group's fields of a word) are exact; the code offset comes off
    as -OFF * sum(xi) per window; each window's sum converts to float with the 2**23 + 2**22 bias trick (no
    integer-to-float instruction), so |sum| < 2**22 bounds xi (ops.py picks XMAX).
    UNROLL > 1 (>= b_end - b_start, `ops.idp_unroll`): the blocks in straight-line code, else a loop.
    """
    WPB: tl.constexpr = 16 * BITS
    TW: tl.constexpr = 32 if BITS == 3 else WPB
    SPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    SPG: tl.constexpr = GROUP // _W
    NWIN: tl.constexpr = SPW // SPG if SPG < SPW else 1
    WL: tl.constexpr = SPW // NWIN
    GPB: tl.constexpr = _BLOCK_K // GROUP
    GPW: tl.constexpr = WL // SPG if WL >= SPG else 0
    NT: tl.constexpr = TW // _W
    BSTEP: tl.constexpr = WPB * _R
    RS: tl.constexpr = _R // SLICES
    t1 = tl.arange(0, NT)
    w1 = tl.arange(0, _W)
    tt = t1[:, None, None]
    ww = w1[None, :, None]
    rr = tl.arange(0, RS)[None, None, :]
    x_col = x_row + t1[:, None] * (SPW * _W) + w1[None, :]
    g_t = (t1 * SPW) // SPG
    kcol = t1[:, None] * (SPW * _W) + w1[None, :]  # [NT, 16]: k of field 0 of every column (block 0)
    w_tile = w_grp + (tt * _W + ww) * _R + rr
    h_tile = w_tile
    if BITS == 3:
        h_tile = w_grp + (32 + ww + tt * 0) * _R + rr
        h_shift = tt * 4 + ww * 0 + rr * 0
    else:
        h_shift = 0
    a0 = tl.zeros([NT, _W, RS], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    s_t = s_row0 + g_t[:, None, None]
    # The loop (below) double-buffers in registers: block b + 1's words and scales load while block b computes (an
    # asynchronous-copy pipeline through shared memory instead, `tl.range(.., num_stages=3)`, made whole frames
    # 4-22% slower on an H100: the loop is issue-bound and the copies add shared-memory loads; bench/RESULTS.md,
    # eighth session)
    if UNROLL > 1:  # all UNROLL blocks in straight-line code (masked past b_end): no loop-carried tiles, so the
        # compiler may issue every block's loads before the first block's arithmetic
        for j in tl.static_range(UNROLL):
            b = b_start + j
            (w0, h0, s00, s01, s02, s03, w1_, h1, s10, s11, s12, s13, w2, h2, s20, s21, s22, s23, w3, h3, s30, s31,
             s32, s33) = _load_slices(w_tile, h_tile, s_t, row0, rr, N, stride_sn, b, b_end, BITS, GROUP, NT, RS,
                                      BSTEP, GPB, GPW, NWIN, SLICES)
            # x of a masked block: the last live one's (in bounds; its scales are 0, so it adds nothing)
            a0, a1, a2, a3 = _idp_block(x_col, g_ptr + kcol, kcol, K, tl.minimum(b, b_end - 1) * _BLOCK_K, inv,
                                        w0, h0, s00, s01, s02, s03, w1_, h1, s10, s11, s12, s13, w2, h2, s20, s21,
                                        s22, s23, w3, h3, s30, s31, s32, s33, a0, a1, a2, a3, h_shift, BITS, OFF,
                                        GROUP, EVEN_K, SLICES, ASM, NORM)
    else:
        (w0, h0, s00, s01, s02, s03, w1_, h1, s10, s11, s12, s13, w2, h2, s20, s21, s22, s23, w3, h3, s30, s31, s32,
         s33) = _load_slices(w_tile, h_tile, s_t, row0, rr, N, stride_sn, b_start, b_end, BITS, GROUP, NT, RS, BSTEP,
                             GPB, GPW, NWIN, SLICES)
        for b in range(b_start, b_end):
            (nw0, nh0, n00, n01, n02, n03, nw1, nh1, n10, n11, n12, n13, nw2, nh2, n20, n21, n22, n23, nw3, nh3, n30,
             n31, n32, n33) = _load_slices(w_tile, h_tile, s_t, row0, rr, N, stride_sn, b + 1, b_end, BITS, GROUP, NT,
                                           RS, BSTEP, GPB, GPW, NWIN, SLICES)
            a0, a1, a2, a3 = _idp_block(x_col, g_ptr + kcol, kcol, K, b * _BLOCK_K, inv, w0, h0, s00, s01, s02, s03,
                                        w1_, h1, s10, s11, s12, s13, w2, h2, s20, s21, s22, s23, w3, h3, s30, s31,
                                        s32, s33, a0, a1, a2, a3, h_shift, BITS, OFF, GROUP, EVEN_K, SLICES, ASM, NORM)
            w0, h0, s00, s01, s02, s03 = nw0, nh0, n00, n01, n02, n03
            w1_, h1, s10, s11, s12, s13 = nw1, nh1, n10, n11, n12, n13
            w2, h2, s20, s21, s22, s23 = nw2, nh2, n20, n21, n22, n23
            w3, h3, s30, s31, s32, s33 = nw3, nh3, n30, n31, n32, n33
    y0 = tl.sum(tl.sum(a0, axis=1), axis=0)
    if SLICES == 4:
        y1 = tl.sum(tl.sum(a1, axis=1), axis=0)
        y2 = tl.sum(tl.sum(a2, axis=1), axis=0)
        y3 = tl.sum(tl.sum(a3, axis=1), axis=0)
        # rows 4 s + j of slice s: [j, q, p] -> [p, q, j] is slice 2 p + q
        y0 = tl.reshape(tl.permute(tl.join(tl.join(y0, y1), tl.join(y2, y3)), (2, 1, 0)), (_R,))
    return y0


@triton.jit
def int_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr, N, K, n_blocks,
                    blocks_per_split, n_split, magic, stride_xm, stride_wg, w3_off, stride_sn, stride_om, stride_ps,
                    stride_pm, stride_rm, BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr,
                    EVEN_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr,
                    PDL: tl.constexpr, BPP: tl.constexpr, HAS_RES: tl.constexpr, XMAX: tl.constexpr = 0,
                    SLICES: tl.constexpr = 1, ASM: tl.constexpr = True, g_ptr=None, eps=0.0,
                    NORM: tl.constexpr = False, ss_out=None, SS: tl.constexpr = False, zero_ptr=None,
                    ZERO: tl.constexpr = False, SPLIT_MAX: tl.constexpr = 0, rs_ptr=None, rs_k=1, rs_eps=0.0,
                    RS: tl.constexpr = False, gx_g=None, gx_ptr=None, GX: tl.constexpr = False,
                    UNROLL: tl.constexpr = 1):
    """y[m, n] = sum_k x[m, k] w[n, k]; grid (cdiv(N, 16), n_split, M), one 16-row group per program, BPP >=
    blocks_per_split blocks unrolled;
    magic: pass 0x4B000000; stride_wg: int32 words per row group (16 W).
    XMAX > 0: the integer-dot path (`_int_rows_gemv_idp`): x[m, this program's K range] is scaled to integers in
    [-XMAX, XMAX] (one max |x| pass first) and meets the codes in dp2a instructions; SLICES, ASM as there.
    NORM (XMAX > 0): y = rms_norm(x) w^T with the norm folded in (weight g [K], eps): the first pass
    takes sum(x**2) and max |x g| over the whole row, the codes meet x g, and rsqrt(mean(x**2) + eps) scales y.

    GATED: the weight holds w1 over w3 (w3's row groups start w3_off words in; its scales N rows down) and
    y = silu(x w1^T) * (x w3^T). HAS_RES: y = r + x w^T (r [M, N] in y's dtype, `store_output`).
    PARTIAL (split-K in one launch): each program writes the fp32 partial sums of its K range to
    part[pid_k, m, :] (gated: both halves side by side, [.., 2N]), then counts itself in cnt[m, pid_n] (int32,
    zero before the launch); the program that arrives last sums the n_split partials, writes y and sets its
    counter back to 0 for the next launch. Launches sharing cnt must therefore not run concurrently.
    SS, ZERO: as in `triton_float.float_gemv_kernel` (the output's sum of squares for the next GEMV's norm).
    RS (one row): x arrives multiplied by its RMSNorm's weight (a producer's GX), and y is scaled by the norm's
    rsqrt(rs_ptr[0] / rs_k + rs_eps) (rs_ptr: x's sum of squares, a producer's SS; rs_k: x's columns): the norm
    without a launch.
    GX (one row): also store y * gx_g[n] to gx_ptr (`common.store_output`); SPLIT_MAX: `common.finish_split`.
    """
    pdl_start(PDL)
    zero_once(zero_ptr, ZERO)
    if RS:
        ss_in = tl.load(rs_ptr)  # loaded first, used last: its round trip overlaps the weights
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * _R + tl.arange(0, _R)
    rows = tl.minimum(offs_n, N - 1)  # scales: clamp instead of masking the loads; the store is masked
    w_grp = w_ptr + pid_n.to(tl.int64) * stride_wg  # padded row groups: every word of the group exists
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    x_row = x_ptr + pid_m * stride_xm
    if XMAX > 0:
        if NORM:
            ss, amax = _x_norm_stats(x_row, g_ptr, K, EVEN_K)
            out_scale = amax / XMAX * (1.0 / tl.sqrt_rn(ss / K + eps))
        else:
            amax = _x_absmax(x_row, K, b_start * _BLOCK_K, b_end * _BLOCK_K, EVEN_K)
            out_scale = amax / XMAX
        # below 1e-30 (XMAX / amax would overflow fp32) x counts as zero: an output error under 1e-30 sum |w|
        inv = tl.where(amax > 1e-30, XMAX / amax, 0.0)
        y = _int_rows_gemv_idp(x_row, g_ptr, w_grp, s_ptr, stride_sn, pid_n * _R, N, K, b_start, b_end, inv, BITS,
                               OFF, GROUP, EVEN_K, SLICES, ASM, NORM, UNROLL) * out_scale
        if GATED:
            y3 = _int_rows_gemv_idp(x_row, g_ptr, w_grp + w3_off, s_ptr + N * stride_sn, stride_sn, pid_n * _R, N,
                                    K, b_start, b_end, inv, BITS, OFF, GROUP, EVEN_K, SLICES, ASM, NORM,
                                    UNROLL) * out_scale
    else:
        y = _int_rows_gemv(x_row, w_grp, s_ptr + rows * stride_sn, K, b_start, b_end, magic, BITS, OFF, GROUP,
                           EVEN_K, BPP)
        if GATED:
            y3 = _int_rows_gemv(x_row, w_grp + w3_off, s_ptr + (rows + N) * stride_sn, K, b_start, b_end, magic,
                                BITS, OFF, GROUP, EVEN_K, BPP)
    if not GATED:
        y3 = y  # (not used)
    if RS:
        rs = rs_scale(ss_in, rs_k, rs_eps)
        y = y * rs
        y3 = y3 * rs
    n_mask = offs_n < N
    out_row = out_ptr + pid_m * stride_om
    r_row = r_ptr + pid_m * stride_rm
    g_ptrs = r_row + offs_n  # (not read without GX)
    gx_ptrs = r_row + offs_n
    if GX:
        g_ptrs = gx_g + offs_n
        gx_ptrs = gx_ptr + pid_m * stride_om + offs_n
    if PARTIAL:
        finish_split(y, y3, offs_n, n_mask, part_ptr + pid_m * stride_pm, pid_k, stride_ps, N,
                     cnt_ptr + pid_m * tl.num_programs(0) + pid_n, n_split, out_row + offs_n, r_row + offs_n,
                     GATED, HAS_RES, ss_out, SS, SPLIT_MAX, g_ptrs, gx_ptrs, GX)
    else:
        if GATED:
            y = y * tl.sigmoid(y) * y3
        store_output(out_row + offs_n, y, n_mask, r_row + offs_n, HAS_RES, ss_out, SS, g_ptrs, gx_ptrs, GX)


@triton.jit
def _int_codes(t, P: tl.constexpr, NB: tl.constexpr):
    """The unsigned NB-bit field at bit P of the int32 words t."""
    return (t >> P) & ((1 << NB) - 1)


@triton.jit
def _int_rows_gemm(x_cols, m_mask, w_rows, s_rows, K, b_start, b_end, BITS: tl.constexpr, OFF: tl.constexpr,
                   GROUP: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """w[BLOCK_N rows] @ x[BLOCK_M, K]^T over blocks [b_start, b_end) -> fp32 [BLOCK_N, BLOCK_M] (tensor cores).

    The weight is the dot's left operand (the "swapped" small-M GEMM): with BLOCK_N = 64 rows and 4 warps the
    compiler loads the words straight into wgmma's register operand and dequantizes them there, where the weight
    as the right operand went through shared memory (bench/RESULTS.md, sixth session); x^T is the small operand.
    x_cols: [16, BLOCK_M] pointers (column j, row m); w_rows: [BLOCK_N, 16] pointers to word j of block 0 of each
    row (interleaved layout: words of one row are 16 apart); codes go to x's dtype exactly (|code| <= 15).
    IEEE: multiply in fp32 (fp32 x; also bf16 x under the triton interpreter, whose bf16 dot is wrong).
    """
    offs_w = tl.arange(0, _W)
    SPW: tl.constexpr = 32 // BITS if BITS != 3 else 16
    SPG: tl.constexpr = GROUP // _W
    NW: tl.constexpr = BITS if BITS != 3 else 2  # words of codes per row and block (3-bit: + one of high bits)
    # (each scale group lies within one word's slots: groups of 32+ codes, `ops.int_linear_impl` checks)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_g = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for b in range(b_start, b_end):
        wb = w_rows + b * (_W * BITS * _R)
        kb = b * _BLOCK_K
        if BITS == 3:
            th = tl.load(wb + 2 * _W * _R)
        # a runtime loop over the block's words (inner slots unrolled): the whole block unrolled compiled for up to
        # 30 s (q2_k's 16-code groups with mins, when q2_k ran here), the longest kernel of a cold start
        for t in range(NW):
            tw = tl.load(wb + t * _W * _R)
            for i in tl.static_range(SPW):
                s = t * SPW + i  # the slot
                k0 = kb + s * _W
                if EVEN_K:
                    xv = tl.load(x_cols + k0, mask=m_mask[None, :], other=0.0)
                else:
                    xv = tl.load(x_cols + k0, mask=m_mask[None, :] & (k0 + offs_w < K)[:, None], other=0.0)
                if BITS == 3:
                    u = _int_codes(tw, 8 * (i % 4) + 2 * (i // 4), 2) | \
                        (((th >> (8 * (i % 4) + t * (SPW // 4) + i // 4)) & 1) << 2)
                else:
                    u = _int_codes(tw, 8 * (i % 4) + BITS * (i // 4), BITS)
                wv = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)
                if IEEE:
                    part = tl.dot(wv, xv.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(wv.to(xv.dtype), xv)
                # groups inside a word: where each starts and ends is known at compile time
                if tl.constexpr(i) % SPG == 0:
                    acc_g = part
                else:
                    acc_g += part
                if tl.constexpr(i) % SPG == SPG - 1:
                    acc += acc_g * tl.load(s_rows + b * (_BLOCK_K // GROUP) + s // SPG).to(tl.float32)[:, None]
    return acc


@triton.jit
def int_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, r_ptr, M, N, K, n_blocks, blocks_per_split,
                    stride_xm, stride_wg, w3_off, n_pad, stride_sn, stride_om, stride_os, stride_rm,
                    BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr,
                    EVEN_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr, HAS_RES: tl.constexpr):
    """Small-M GEMM, grid (cdiv(N, BLOCK_N), split, cdiv(M, BLOCK_M)); outputs and weight arguments as in
    `int_gemv_kernel`; n_pad: storage rows of one weight (padded_rows(N)). HAS_RES only without PARTIAL (the
    split-K reduction adds the residual then). Tiles are [BLOCK_N, BLOCK_M] (`_int_rows_gemm`), stored transposed."""
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_n, N - 1)
    m_mask = offs_m < M
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    x_cols = x_ptr + offs_m[None, :] * stride_xm + tl.arange(0, _W)[:, None]
    q_rows = tl.minimum(offs_n, n_pad - 1)  # storage rows (padded groups exist)
    q_base = (q_rows // _R).to(tl.int64) * stride_wg + q_rows % _R
    w_rows = w_ptr + q_base[:, None] + tl.arange(0, _W)[None, :] * _R
    y = _int_rows_gemm(x_cols, m_mask, w_rows, s_ptr + rows * stride_sn, K, b_start, b_end, BITS, OFF, GROUP,
                       EVEN_K, IEEE, BLOCK_M, BLOCK_N)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = m_mask[None, :] & (offs_n < N)[:, None]
    if GATED:
        rows3 = rows + N
        w_rows3 = w_rows + w3_off
        y3 = _int_rows_gemm(x_cols, m_mask, w_rows3, s_ptr + rows3 * stride_sn, K, b_start, b_end, BITS, OFF,
                            GROUP, EVEN_K, IEEE, BLOCK_M, BLOCK_N)
        if PARTIAL:
            tl.store(out_ptrs, y, mask=mask)
            tl.store(out_ptrs + N, y3, mask=mask)
        else:
            y = y * tl.sigmoid(y) * y3
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        r_ptrs = r_ptr + offs_m[None, :] * stride_rm + offs_n[:, None]
        store_output(out_ptrs, y, mask, r_ptrs, HAS_RES)
