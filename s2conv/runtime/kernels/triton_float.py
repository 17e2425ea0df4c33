"""Triton kernels for row-major weights (fp8 e4m3 or int8 with a per-row scale, plain bf16) and the GEMM's split-K
reduction.

The weight stays in its natural [N, K] row-major layout; a program reads a [BLOCK_N, BLOCK_K] tile per step.
"""
from __future__ import annotations

import triton
import triton.language as tl

from s2conv.runtime.kernels.common import finish_split, norm_scale, pdl_start, round_to, store_output, zero_once


@triton.jit
def _to_float(w, ASM: tl.constexpr):
    """A weight tile in fp32. int8 with ASM: four codes at a time without the integer-to-float instruction (an
    H100 converts 16 per SM and clock): the codes' bytes, flipped to offset binary, become the low bytes of four
    fp16 values 1024 + code + 128 (two byte permutes), and two half2 subtractions of 1152 leave the codes, exact.
    Other dtypes (and int8 under the interpreter, which runs no PTX): a plain conversion."""
    if ASM and w.dtype == tl.int8:
        h = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; xor.b32 t, $2, 0x80808080; mov.b32 c, 0x64806480; "
            "prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; "
            "sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; }",
            "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
        return h.to(tl.float32)
    return w.to(tl.float32)


@triton.jit
def _float_rows_gemv(x_row, w_rows, K, k_start, k_end, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PIPE: tl.constexpr = 1, ASM: tl.constexpr = False,
                     g_ptr=None, rs=1.0, NORM: tl.constexpr = False, FIX: tl.constexpr = False,
                     s_rows=None, m_rows=None, GROUP: tl.constexpr = 0, HAS_MIN: tl.constexpr = False,
                     SCALED: tl.constexpr = False):
    """sum_k w[n, k] x[k] for k in [k_start, k_end) -> fp32 [BLOCK_N]; w_rows: [BLOCK_N, BLOCK_K] pointers.

    PIPE > 1: the loop's loads go through a PIPE-stage asynchronous copy pipeline in shared memory (triton
    pipelines a loop without a dot only when the loop asks for it: `tl.range(.., num_stages=)`), so PIPE - 1 tiles
    are in flight while one is summed, without holding them in registers; PIPE = 1: a plain loop.
    ASM: `_to_float`.
    NORM: x goes through fish-speech's RMSNorm on the fly, with its two roundings to x's dtype: round(round(x rs) g)
    (rs: the row's `norm_scale`, g: the norm weight; FIX: round bf16 by hand, for the interpreter).
    GROUP > 0 (dividing BLOCK_K): a scale per GROUP codes, s_rows [BLOCK_N] pointing at each row's scales (and with
    HAS_MIN its mins, m_rows: w = scale * code - min); each step's products are summed per group, then scaled, or
    with SCALED each code is scaled (less its min) into the running products instead (`_scale_groups`: one multiply
    a code, where the sums per group take shuffles across lanes; the loop's SASS per code and thread, triton 3.9
    for sm_90: q8_0 9.2 against 19.3, q6_k 8.2 against 14.8, q8 with a scale per row 6.1). Fewer instructions
    were faster only where the groups carry mins: `ops.scaled_codes` picks the form."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    NG: tl.constexpr = BLOCK_K // GROUP if GROUP > 0 else 1
    offs_g = tl.arange(0, NG)
    acc_g = tl.zeros([BLOCK_N, NG], tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=PIPE):
        if EVEN_K:
            w = tl.load(w_rows + k0)
            xv = tl.load(x_row + k0 + offs_k)
        else:
            w = tl.load(w_rows + k0, mask=(k0 + offs_k < K)[None, :], other=0.0)
            xv = tl.load(x_row + k0 + offs_k, mask=k0 + offs_k < K, other=0.0)
        if NORM:
            g = tl.load(g_ptr + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
            xn = round_to(xv.to(tl.float32) * rs, xv.dtype, FIX).to(tl.float32)
            xv = round_to(xn * g, xv.dtype, FIX)
        if GROUP > 0 and SCALED:
            wf = _scale_groups(_to_float(w, ASM), s_rows, m_rows, k0, K, BLOCK_N, BLOCK_K, GROUP, HAS_MIN)
            acc += wf * xv.to(tl.float32)[None, :]
        elif GROUP > 0:
            xf = xv.to(tl.float32)
            part = tl.sum(tl.reshape(_to_float(w, ASM) * xf[None, :], [BLOCK_N, NG, GROUP]), axis=2)
            g_idx = (k0 // GROUP + offs_g)[None, :]
            if EVEN_K:
                acc_g += part * tl.load(s_rows[:, None] + g_idx)
                if HAS_MIN:
                    acc_g -= tl.load(m_rows[:, None] + g_idx) * tl.sum(tl.reshape(xf, [NG, GROUP]), axis=1)[None, :]
            else:
                g_live = g_idx * GROUP < K
                acc_g += part * tl.load(s_rows[:, None] + g_idx, mask=g_live, other=0.0)
                if HAS_MIN:
                    acc_g -= (tl.load(m_rows[:, None] + g_idx, mask=g_live, other=0.0)
                              * tl.sum(tl.reshape(xf, [NG, GROUP]), axis=1)[None, :])
        else:
            acc += _to_float(w, ASM) * xv.to(tl.float32)[None, :]
    if GROUP > 0 and not SCALED:
        return tl.sum(acc_g, axis=1)
    return tl.sum(acc, axis=1)


@triton.jit
def float_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr, N, K, k_per_split, n_split,
                      stride_xm, stride_wn, stride_om, stride_ps, stride_pm, stride_rm,
                      HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, HAS_RES: tl.constexpr,
                      PIPE: tl.constexpr = 1, ASM: tl.constexpr = False, ss_in=None, g_ptr=None, eps=0.0,
                      NORM: tl.constexpr = False, FIX: tl.constexpr = False, ss_out=None, SS: tl.constexpr = False,
                      zero_ptr=None, ZERO: tl.constexpr = False, SPLIT_MAX: tl.constexpr = 0, gx_g=None,
                      gx_ptr=None, GX: tl.constexpr = False, stride_sn=0, GROUP: tl.constexpr = 0, m_ptr=None,
                      HAS_MIN: tl.constexpr = False, SCALED: tl.constexpr = False):
    """y[m, n] = scale[n] * sum_k x[m, k] w[n, k] (GROUP > 0, SCALED: scales [R, groups] per GROUP codes, row stride
    stride_sn, and with HAS_MIN mins m_ptr alike: `_float_rows_gemv`); grid (cdiv(N, BLOCK_N), n_split, M);
    PIPE, ASM: `_float_rows_gemv`; HAS_RES: y = r + ... (`store_output`). PARTIAL (split-K): fp32 partials to part
    [n_split, M, N (2N gated)], the last-arriving program of each row tile reduces them (`finish_split`, counters
    cnt [M, cdiv(N, BLOCK_N)]).
    One row (M = 1) can chain RMSNorms through the GEMVs: NORM takes rms_norm(x) with weight g_ptr (eps) for x, the
    row's sum of squares read from ss_in; SS adds the output's sum of squares to ss_out (`store_output`); ZERO sets
    zero_ptr[0] = 0 (the slot this launch's input norm was read from, once every reader has finished); GX also
    stores y * gx_g[n] to gx_ptr for an integer GEMV that reads it (`triton_int.int_gemv_kernel`'s RS)."""
    pdl_start(PDL)  # before the slot reset and the statistic's load (launch.py's rule: nothing but weights first)
    zero_once(zero_ptr, ZERO)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_row = x_ptr + pid_m * stride_xm
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    rs = norm_scale(ss_in, K, eps) if NORM else 1.0
    y = _float_rows_gemv(x_row, w_rows, K, k_start, k_end, EVEN_K, BLOCK_N, BLOCK_K, PIPE, ASM, g_ptr, rs, NORM,
                         FIX, s_ptr + rows * stride_sn, m_ptr + rows * stride_sn, GROUP, HAS_MIN, SCALED)
    if HAS_SCALE and GROUP == 0:
        y = y * tl.load(s_ptr + rows)
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    r_ptrs = r_ptr + pid_m * stride_rm + offs_n
    n_mask = offs_n < N
    g_ptrs = r_ptrs  # (not read without GX)
    gx_ptrs = r_ptrs
    if GX:
        g_ptrs = gx_g + offs_n
        gx_ptrs = gx_ptr + pid_m * stride_om + offs_n
    y3 = y  # (not used without GATED)
    if GATED:
        rows3 = rows + N
        w_rows3 = w_ptr + rows3[:, None].to(tl.int64) * stride_wn + tl.arange(0, BLOCK_K)[None, :]
        y3 = _float_rows_gemv(x_row, w_rows3, K, k_start, k_end, EVEN_K, BLOCK_N, BLOCK_K, PIPE, ASM, g_ptr, rs,
                              NORM, FIX, s_ptr + rows3 * stride_sn, m_ptr + rows3 * stride_sn, GROUP, HAS_MIN,
                              SCALED)
        if HAS_SCALE and GROUP == 0:
            y3 = y3 * tl.load(s_ptr + rows3)
    if PARTIAL:
        finish_split(y, y3, offs_n, n_mask, part_ptr + pid_m * stride_pm, pid_k, stride_ps, N,
                     cnt_ptr + pid_m * tl.num_programs(0) + pid_n, n_split, out_ptrs, r_ptrs, GATED, HAS_RES,
                     ss_out, SS, SPLIT_MAX, g_ptrs, gx_ptrs, GX)
    else:
        if GATED:
            y = y * tl.sigmoid(y) * y3
        store_output(out_ptrs, y, n_mask, r_ptrs, HAS_RES, ss_out, SS, g_ptrs, gx_ptrs, GX)


@triton.jit
def _load_step(x_rows, w_rows, m_mask, k0, K, offs_k, EVEN_K: tl.constexpr):
    """x [BLOCK_M, width] and w [BLOCK_N, width] at columns k0 + offs_k (zeros past K and in masked rows of x)."""
    if EVEN_K:
        return tl.load(x_rows + k0, mask=m_mask[:, None], other=0.0), tl.load(w_rows + k0)
    kmask = (k0 + offs_k < K)[None, :]
    return tl.load(x_rows + k0, mask=m_mask[:, None] & kmask, other=0.0), tl.load(w_rows + k0, mask=kmask, other=0.0)


@triton.jit
def _scale_groups(wf, s_rows, m_rows, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  HAS_MIN: tl.constexpr):
    """Codes wf [BLOCK_N, BLOCK_K] (fp32) at columns k0.. -> scale * code (- min), a scale per GROUP."""
    NG: tl.constexpr = BLOCK_K // GROUP
    g_idx = (k0 // GROUP + tl.arange(0, NG))[None, :]
    g_live = g_idx * GROUP < K
    w3 = tl.reshape(wf, [BLOCK_N, NG, GROUP]) * tl.load(s_rows[:, None] + g_idx, mask=g_live, other=0.0)[:, :, None]
    if HAS_MIN:
        w3 -= tl.load(m_rows[:, None] + g_idx, mask=g_live, other=0.0)[:, :, None]
    return tl.reshape(w3, [BLOCK_N, BLOCK_K])


@triton.jit
def _float_rows_gemm(x_rows, m_mask, w_rows, K, k_start, k_end, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, s_rows=None, m_rows=None,
                     GROUP: tl.constexpr = 0, HAS_MIN: tl.constexpr = False, PER_GROUP: tl.constexpr = False):
    """x [BLOCK_M, K] @ w[BLOCK_N rows]^T over [k_start, k_end) -> fp32 [BLOCK_M, BLOCK_N]; w goes to x's dtype.
    IEEE: fp32 x; also bf16 x under the triton interpreter, whose bf16 dot is wrong.
    GROUP > 0 (dividing BLOCK_K; K a multiple of it): w = scale * code (- min) per group, s_rows / m_rows [BLOCK_N]
    pointing at each row's scales / mins. PER_GROUP (x_rows / w_rows are then [.., GROUP] pointer tiles): one dot
    per group of the exact codes, scaled in fp32 (the mins meet the group's sums of x); else each step's tile is
    dequantized in fp32 and, for 16-bit x, split into two 16-bit parts (w = hi + lo to ~2**-16 of w) that meet x
    in two dots: as exact, and faster where groups are short or carry mins (batch 32 on an H100, frames/s: q6_k
    2,002 -> 2,091, q5_k 1,719 -> 2,174; q8_0 gains from the dots per group: bench/RESULTS.md, fifteenth session)."""
    offs_k = tl.arange(0, GROUP if PER_GROUP else BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PER_GROUP:
            for j in tl.static_range(BLOCK_K // GROUP):
                kg = k0 + j * GROUP
                xv, w = _load_step(x_rows, w_rows, m_mask, kg, K, offs_k, False)  # whole groups: all in or out
                if IEEE:
                    d = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                else:
                    d = tl.dot(xv, tl.trans(w.to(xv.dtype)))
                live_n = tl.full([BLOCK_N], kg, tl.int32) < K
                acc += d * tl.load(s_rows + kg // GROUP, mask=live_n, other=0.0)[None, :]
                if HAS_MIN:
                    acc -= (tl.sum(xv.to(tl.float32), axis=1)[:, None]
                            * tl.load(m_rows + kg // GROUP, mask=live_n, other=0.0)[None, :])
        else:
            xv, w = _load_step(x_rows, w_rows, m_mask, k0, K, offs_k, EVEN_K)
            if GROUP > 0:
                wf = _scale_groups(w.to(tl.float32), s_rows, m_rows, k0, K, BLOCK_N, BLOCK_K, GROUP, HAS_MIN)
                if IEEE:
                    acc = tl.dot(xv.to(tl.float32), tl.trans(wf), acc, input_precision="ieee")
                else:
                    hi = wf.to(xv.dtype)
                    acc = tl.dot(xv, tl.trans(hi), acc)
                    acc = tl.dot(xv, tl.trans((wf - hi.to(tl.float32)).to(xv.dtype)), acc)
            elif IEEE:
                acc = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, tl.trans(w.to(xv.dtype)), acc)
    return acc


@triton.jit
def float_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, r_ptr, M, N, K, k_per_split,
                      stride_xm, stride_wn, stride_om, stride_os, stride_rm,
                      HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr, HAS_RES: tl.constexpr, stride_sn=0, GROUP: tl.constexpr = 0, m_ptr=None,
                      HAS_MIN: tl.constexpr = False, PER_GROUP: tl.constexpr = False):
    """Small-M GEMM for float weights, grid (cdiv(N, BLOCK_N), split, cdiv(M, BLOCK_M)); outputs as
    `float_gemv_kernel` (GROUP, PER_GROUP: `_float_rows_gemm`)."""
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_n, N - 1)
    m_mask = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = tl.arange(0, GROUP if PER_GROUP else BLOCK_K)  # PER_GROUP: one dot per scale group
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    y = _float_rows_gemm(x_rows, m_mask, w_rows, K, k_start, k_end, EVEN_K, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
                         s_ptr + rows * stride_sn, m_ptr + rows * stride_sn, GROUP, HAS_MIN, PER_GROUP)
    if HAS_SCALE and GROUP == 0:
        y = y * tl.load(s_ptr + rows)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & (offs_n < N)[None, :]
    if GATED:
        rows3 = rows + N
        w_rows3 = w_ptr + rows3[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        y3 = _float_rows_gemm(x_rows, m_mask, w_rows3, K, k_start, k_end, EVEN_K, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
                              s_ptr + rows3 * stride_sn, m_ptr + rows3 * stride_sn, GROUP, HAS_MIN, PER_GROUP)
        if HAS_SCALE and GROUP == 0:
            y3 = y3 * tl.load(s_ptr + rows3)[None, :]
        if PARTIAL:
            tl.store(out_ptrs, y, mask=mask)
            tl.store(out_ptrs + N, y3, mask=mask)
        else:
            y = y * tl.sigmoid(y) * y3
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        store_output(out_ptrs, y, mask, r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], HAS_RES)


@triton.jit
def splitk_reduce_kernel(p_ptr, out_ptr, r_ptr, N, SPLIT, stride_ps, stride_pm, stride_om, stride_rm,
                         GATED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, HAS_RES: tl.constexpr):
    """out[m, n] = sum_s p[s, m, n] (GATED: silu of that times the sum at column N + n; HAS_RES: + r[m, n] as in
    `store_output`); grid (cdiv(N, BLOCK), M)."""
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pid_m = tl.program_id(1)
    mask = offs < N
    p_row = p_ptr + pid_m * stride_pm + offs
    acc = tl.zeros([BLOCK], tl.float32)
    acc3 = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_row + s * stride_ps, mask=mask, other=0.0)
        if GATED:
            acc3 += tl.load(p_row + s * stride_ps + N, mask=mask, other=0.0)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc3
    store_output(out_ptr + pid_m * stride_om + offs, acc, mask, r_ptr + pid_m * stride_rm + offs, HAS_RES)
