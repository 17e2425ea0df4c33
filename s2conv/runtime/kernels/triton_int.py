"""Triton kernels for the integer formats in the slot-planar layout of `layout.py`: GEMV (M = 1), small-M GEMM.

Dequantization without integer-to-float conversions (the H100 converts 16 ints per SM and clock, 8x slower than
it multiplies): OR-ing a bit field v < 2**23 into the mantissa of 2.0**23 gives the float 2**23 + v exactly, and
one subtraction gives the code. A field at bit position p is read in place as v = u * 2**p (no shift) and the x
it meets is pre-scaled by 2**-p, once per program instead of once per weight row. Both scalings are powers of two,
so products equal the reference dequantize-then-multiply in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

_BLOCK_K = tl.constexpr(512)  # codes per block (layout.BLOCK_K)
_W = tl.constexpr(16)  # int32 words per sub-tile row (layout.WORDS)


@triton.jit
def _load_x(x_ptrs, k0, K, offs, EVEN_K: tl.constexpr):
    """x[k0 + offs] (zero beyond K) in the pointer's dtype."""
    if EVEN_K:
        return tl.load(x_ptrs + k0)
    else:
        return tl.load(x_ptrs + k0, mask=k0 + offs < K, other=0.0)


@triton.jit
def _fma_field(acc, t, t_hi, magic, xv, P: tl.constexpr, NB: tl.constexpr, OFF: tl.constexpr,
               XMUL: tl.constexpr):
    """acc + (field - OFF) * XMUL * x for the NB-bit field at bit P of the words t [BN, 16] and x [16] (fp32).

    Exact: the field is read in place as the float 2**23 + field * 2**Q (one LOP3), made (field - OFF) * 2**Q by one
    subtraction and met with x * XMUL * 2**-Q (computed once per program and x element, not per row).
    magic = 0x4B000000 arrives as a kernel argument so that the compiler keeps it in a register instead of
    re-materializing the constant per weight. Fields ending above bit 22 are read from t_hi = t >> 16 (Q = P - 16).
    """
    if P + NB > 23:
        f = ((t_hi & (((1 << NB) - 1) << (P - 16))) | magic).to(tl.float32, bitcast=True)
        f = f - (8388608.0 + OFF * (1 << (P - 16)))
        xq = xv * (XMUL / (1 << (P - 16)))
    else:
        f = ((t & (((1 << NB) - 1) << P)) | magic).to(tl.float32, bitcast=True)
        f = f - (8388608.0 + OFF * (1 << P))
        xq = xv * (XMUL / (1 << P))
    return acc + f * xq[None, :]


@triton.jit
def _int_rows_gemv(x_row, w_rows, s_rows, m_rows, K, b_start, b_end, magic,
                   BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                   EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_k w[n, k] * x[k] over blocks [b_start, b_end) for BLOCK_N rows -> fp32 [BLOCK_N].

    w_rows: [BLOCK_N, 16] pointers to word j of each row's first block; s_rows / m_rows: [BLOCK_N] pointers to each
    row's scales / mins. GROUP = 0: one scale per row, applied here at the end.
    """
    offs_w = tl.arange(0, _W)
    x_ptrs = x_row + offs_w
    # per-row scale pointers broadcast over the tile's 16 columns: loaded in the tile's own register layout, the
    # scales need no layout conversion (a shared-memory round trip with two barriers per group otherwise)
    s_tile = s_rows[:, None] + offs_w[None, :] * 0
    SPW: tl.constexpr = 32 // BITS if BITS != 3 else 16  # slots per sub-tile (3-bit: per low-bit sub-tile)
    SPG: tl.constexpr = GROUP // _W if GROUP > 0 else 1  # slots per scale group
    acc = tl.zeros([BLOCK_N, _W], tl.float32)
    acc_g = tl.zeros([BLOCK_N, _W], tl.float32)
    corr = tl.zeros([BLOCK_N], tl.float32)
    xs = tl.sum(tl.zeros([_W], tl.float32), axis=0)  # group sum of x (asymmetric formats)
    for b in range(b_start, b_end):
        wb = w_rows + b * (_W * BITS)
        kb = b * _BLOCK_K
        if BITS == 3:
            th = tl.load(wb + 2 * _W)
            th_hi = th >> 16
        for t in tl.static_range(BITS if BITS != 3 else 2):
            tw = tl.load(wb + t * _W)
            tw_hi = tw >> 16
            for i in tl.static_range(SPW):
                s = t * SPW + i  # a compile-time slot index
                xv = _load_x(x_ptrs, kb + s * _W, K, offs_w, EVEN_K).to(tl.float32)
                if GROUP == 0:
                    a = acc
                elif s % SPG == 0:  # first slot of a group
                    a = tl.zeros([BLOCK_N, _W], tl.float32)
                else:
                    a = acc_g
                if BITS == 3:  # u = low2 + 4 * high1; the offset goes with the low field
                    a = _fma_field(a, tw, tw_hi, magic, xv, 2 * i, 2, OFF, 1.0)
                    a = _fma_field(a, th, th_hi, magic, xv, s, 1, 0, 4.0)
                else:
                    a = _fma_field(a, tw, tw_hi, magic, xv, i * BITS, BITS, OFF, 1.0)
                if GROUP == 0:
                    acc = a
                else:
                    acc_g = a
                    if HAS_MIN:
                        if s % SPG == 0:
                            xs = tl.sum(xv, axis=0)
                        else:
                            xs += tl.sum(xv, axis=0)
                    if s % SPG == SPG - 1:  # group complete: apply its scale (and min)
                        g = b * (_BLOCK_K // GROUP) + s // SPG
                        acc += acc_g * tl.load(s_tile + g)
                        if HAS_MIN:
                            corr += tl.load(m_rows + g) * xs
    out = tl.sum(acc, axis=1)
    if GROUP == 0:
        out = out * tl.load(s_rows)
    if HAS_MIN:
        out = out - corr
    return out


@triton.jit
def int_gemv_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, N, K, n_blocks, blocks_per_split, magic,
                    stride_xm, stride_wn, stride_sn, stride_om, stride_os,
                    BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                    EVEN_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k]; grid (cdiv(N, BLOCK_N), split, M); magic: pass 0x4B000000.

    PARTIAL: write fp32 partial sums of this program's K range to out[pid_k, m, :] (reduced by a second kernel);
    else write y in out's dtype. GATED: the weight holds 2N rows (w1 over w3) and y = silu(x w1^T) * (x w3^T);
    partial outputs then hold both halves side by side, [.., 2N].
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # clamp instead of masking the loads; the store is masked
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    x_row = x_ptr + pid_m * stride_xm
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn + tl.arange(0, _W)[None, :]
    y = _int_rows_gemv(x_row, w_rows, s_ptr + rows * stride_sn, m_ptr + rows * stride_sn, K, b_start, b_end,
                       magic, BITS, OFF, GROUP, HAS_MIN, EVEN_K, BLOCK_N)
    out_row = out_ptr + pid_k * stride_os + pid_m * stride_om
    n_mask = offs_n < N
    if GATED:
        rows3 = rows + N
        w_rows3 = w_ptr + rows3[:, None].to(tl.int64) * stride_wn + tl.arange(0, _W)[None, :]
        y3 = _int_rows_gemv(x_row, w_rows3, s_ptr + rows3 * stride_sn, m_ptr + rows3 * stride_sn, K, b_start,
                            b_end, magic, BITS, OFF, GROUP, HAS_MIN, EVEN_K, BLOCK_N)
        if PARTIAL:
            tl.store(out_row + offs_n, y, mask=n_mask)
            tl.store(out_row + N + offs_n, y3, mask=n_mask)
        else:
            y = y * tl.sigmoid(y) * y3
            tl.store(out_row + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out_row + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int_codes(t, P: tl.constexpr, NB: tl.constexpr):
    """The unsigned NB-bit field at bit P of the int32 words t."""
    return (t >> P) & ((1 << NB) - 1)


@triton.jit
def _int_rows_gemm(x_rows, m_mask, w_rows, s_rows, m_rows, K, b_start, b_end,
                   BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                   EVEN_K: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, K] @ w[BLOCK_N rows]^T over blocks [b_start, b_end) -> fp32 [BLOCK_M, BLOCK_N] (tensor cores).

    x_rows: [BLOCK_M, 16] pointers (row m, column j); codes go to x's dtype exactly (|code| <= 255).
    IEEE: multiply in fp32 (fp32 x; also bf16 x under the triton interpreter, whose bf16 dot is wrong).
    """
    offs_w = tl.arange(0, _W)
    SPW: tl.constexpr = 32 // BITS if BITS != 3 else 16
    SPG: tl.constexpr = GROUP // _W if GROUP > 0 else 1
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    xs = tl.zeros([BLOCK_M], tl.float32)
    for b in range(b_start, b_end):
        wb = w_rows + b * (_W * BITS)
        kb = b * _BLOCK_K
        if BITS == 3:
            th = tl.load(wb + 2 * _W)
        for t in tl.static_range(BITS if BITS != 3 else 2):
            tw = tl.load(wb + t * _W)
            for i in tl.static_range(SPW):
                s = t * SPW + i  # a compile-time slot index
                k0 = kb + s * _W
                if EVEN_K:
                    xv = tl.load(x_rows + k0, mask=m_mask[:, None], other=0.0)
                else:
                    xv = tl.load(x_rows + k0, mask=m_mask[:, None] & (k0 + offs_w < K)[None, :], other=0.0)
                if BITS == 3:
                    u = _int_codes(tw, 2 * i, 2) | (_int_codes(th, s, 1) << 2)
                else:
                    u = _int_codes(tw, i * BITS, BITS)
                wv = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)
                if IEEE:
                    part = tl.dot(xv.to(tl.float32), tl.trans(wv), input_precision="ieee")
                else:
                    part = tl.dot(xv, tl.trans(wv.to(xv.dtype)))
                if GROUP == 0:
                    acc += part
                else:
                    if s % SPG == 0:
                        acc_g = part
                        if HAS_MIN:
                            xs = tl.sum(xv.to(tl.float32), axis=1)
                    else:
                        acc_g += part
                        if HAS_MIN:
                            xs += tl.sum(xv.to(tl.float32), axis=1)
                    if s % SPG == SPG - 1:
                        g = b * (_BLOCK_K // GROUP) + s // SPG
                        acc += acc_g * tl.load(s_rows + g)[None, :]
                        if HAS_MIN:
                            acc -= xs[:, None] * tl.load(m_rows + g)[None, :]
    if GROUP == 0:
        acc = acc * tl.load(s_rows)[None, :]
    return acc


@triton.jit
def int_gemm_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, M, N, K, n_blocks, blocks_per_split,
                    stride_xm, stride_wn, stride_sn, stride_om, stride_os,
                    BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                    EVEN_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Small-M GEMM, grid (cdiv(N, BLOCK_N), split, cdiv(M, BLOCK_M)); outputs as in `int_gemv_kernel`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_n, N - 1)
    m_mask = offs_m < M
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    x_rows = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, _W)[None, :]
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn + tl.arange(0, _W)[None, :]
    y = _int_rows_gemm(x_rows, m_mask, w_rows, s_ptr + rows * stride_sn, m_ptr + rows * stride_sn, K, b_start,
                       b_end, BITS, OFF, GROUP, HAS_MIN, EVEN_K, IEEE, BLOCK_M, BLOCK_N)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & (offs_n < N)[None, :]
    if GATED:
        rows3 = rows + N
        w_rows3 = w_ptr + rows3[:, None].to(tl.int64) * stride_wn + tl.arange(0, _W)[None, :]
        y3 = _int_rows_gemm(x_rows, m_mask, w_rows3, s_ptr + rows3 * stride_sn, m_ptr + rows3 * stride_sn, K,
                            b_start, b_end, BITS, OFF, GROUP, HAS_MIN, EVEN_K, IEEE, BLOCK_M, BLOCK_N)
        if PARTIAL:
            tl.store(out_ptrs, y, mask=mask)
            tl.store(out_ptrs + N, y3, mask=mask)
        else:
            y = y * tl.sigmoid(y) * y3
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
