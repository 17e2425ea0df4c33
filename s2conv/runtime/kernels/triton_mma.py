"""Integer GEMV / small-M GEMM on tensor cores for the fragment layout (layout.py): `mma.sync` m16n8k16 in bf16.

Why: the CUDA-core dp2a GEMV (`triton_int`) spends 2.3-2.7 instructions per code; for 2- and 4-bit codes in
groups of 32 or 64 it is slower than for q4. Here one shift and one LOP3 turn two stored codes into the bf16 pair
(128 + u, 128 + u') that mma.sync multiplies with x straight from memory (exact products, fp32 sums), and the
sum of x per group (an mma of the same x against ones) takes the 128 + offset back out, and the mins of the
formats that have them. Per S2 layer on an H100 (`scripts/probe_mma.py`): q2 41.0 -> 38.2 us, q4_0 57.0 -> 45.8,
q4_k 60.7 -> 55.3; q4 (one scale per 128) 40.0 -> 41.1, so q4 keeps the interleaved layout (bench/RESULTS.md,
twelfth session). q2 has since moved to the interleaved layout too, whose CUDA GEMV is faster still at one row
(`layout.uses_fragment_layout`).

Mapping: each warp owns one 16-row tile; lane l = 4 g + q holds rows g and g + 8 of the A fragments, the x of
batch row g in the B fragments (m16n8k16: n = 8 batch rows, so M <= 8 per program), and after the mma the sums
of rows (g, g + 8) for batch rows (2 q, 2 q + 1). Triton lays a [32 * warps] tensor out one element per lane in
lane order, which is what the inline PTX needs (`tests/test_kernels.py` checks the result on GPUs and, with
`_mma_emulated` in place of the PTX, under the interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl
from s2conv.runtime.kernels.common import finish_split, pdl_start, rs_scale, store_output, zero_once


@triton.jit
def _pair(w, F16: tl.constexpr):
    """The two bf16 (F16: fp16) of int32 words (low half first) as fp32."""
    if F16:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, F16: tl.constexpr):
    """`_mma` with tensor operations (triton's interpreter runs no PTX): lane (g, q) holds A[g, 2q..2q+1] (a0),
    A[g+8, ..] (a1), A[g, 8+2q..] (a2), A[g+8, 8+2q..] (a3) and B[2q..2q+1, g] (b0), B[8+2q.., g] (b1); it gets
    C[g, 2q] (c0), C[g, 2q+1] (c1), C[g+8, 2q] (c2), C[g+8, 2q+1] (c3)."""
    L: tl.constexpr = a0.shape[0]
    NW: tl.constexpr = L // 32
    top = tl.zeros([NW, 8, 8], tl.float32)
    bot = tl.zeros([NW, 8, 8], tl.float32)
    for r in tl.static_range(2):
        if r == 0:
            at, ab, bb = a0, a1, b0
        else:
            at, ab, bb = a2, a3, b1
        at_lo, at_hi = _pair(tl.reshape(at, (NW, 8, 1, 4)), F16)  # [warp, g, -, q]
        ab_lo, ab_hi = _pair(tl.reshape(ab, (NW, 8, 1, 4)), F16)
        b_lo, b_hi = _pair(tl.reshape(bb, (NW, 1, 8, 4)), F16)  # [warp, -, n, q]
        top += tl.sum(at_lo * b_lo + at_hi * b_hi, axis=3)
        bot += tl.sum(ab_lo * b_lo + ab_hi * b_hi, axis=3)
    top_e, top_o = tl.split(tl.reshape(top, (NW, 8, 4, 2)))  # columns 2q, 2q + 1
    bot_e, bot_o = tl.split(tl.reshape(bot, (NW, 8, 4, 2)))
    return (c0 + tl.reshape(top_e, (L,)), c1 + tl.reshape(top_o, (L,)), c2 + tl.reshape(bot_e, (L,)),
            c3 + tl.reshape(bot_o, (L,)))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, F16: tl.constexpr, ASM: tl.constexpr):
    """C += A B for one m16n8k16 bf16 (F16: fp16) tile per warp, fp32 accumulators; fragments [32 * warps] in
    PTX order (a*, b*: int32 words holding pairs)."""
    if ASM:
        if F16:
            return tl.inline_asm_elementwise(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
                "{$10,$11,$12,$13};", "=r,=r,=r,=r,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
                "{$10,$11,$12,$13};", "=r,=r,=r,=r,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, F16)


@triton.jit
def _code_pair(w, hw, s: tl.constexpr, H: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, F16: tl.constexpr,
               ASM: tl.constexpr):
    """Step s's code pair of stored words w: bits [BITS s, + BITS) and [16 + BITS s, + BITS) OR-ed into the
    mantissa of 128.0 (0x4300): the bf16 pair (128 + u, 128 + u'), exact (the kernel takes 128 + OFF times the
    sum of x back out per group). F16: the fp16 pair (1024 + u, ..) (0x6400) less 1024 + OFF by one sub.f16x2,
    the codes themselves (with fp16 x, taking 1024 + OFF times the sum of x out lost too many bits).
    3-bit: w holds the low two bits of the codes, hw (the high-bit word of w's kk) their high bits at bits
    8 (s // 4) + 4 H + s % 4 and 16 more (H: w's row half h; layout.py)."""
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    MASK: tl.constexpr = ((1 << LOW) - 1) * 0x00010001
    MAGIC: tl.constexpr = 0x64006400 if F16 else 0x43004300
    if s == 0:
        u = w & MASK
    else:
        u = (w >> (LOW * s)) & MASK
    if BITS == 3:
        HS: tl.constexpr = 8 * (s // 4) + 4 * H + s % 4
        if HS == 0:
            u = u | ((hw & 0x00010001) << 2)
        else:
            u = u | (((hw >> HS) & 0x00010001) << 2)
    if not F16:
        return u | MAGIC
    if ASM:
        bias = tl.full(w.shape, (0x6400 + OFF) * 0x10001, tl.int32)  # the fp16 pair (1024 + OFF, 1024 + OFF)
        return tl.inline_asm_elementwise("sub.rn.f16x2 $0, $1, $2;", "=r,r,r", [u | MAGIC, bias], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        lo = ((u & 0xFFFF) - OFF).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = ((u >> 16) - OFF).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        return lo | (hi << 16)


@triton.jit
def _x_words(x_lane, kw, live, bound, EVEN_K: tl.constexpr):
    """The B-fragment words (b0, b1) of one step: x_lane [L] int32 pointers to each lane's x row (bf16 pairs),
    kw [L] the word offset in the row, live [L] whether the lane's batch row exists; words past bound are 0."""
    offs = kw[:, None] + tl.arange(0, 2)[None, :]
    if EVEN_K:
        xw = tl.load(x_lane[:, None] + offs, mask=live[:, None], other=0)
    else:
        xw = tl.load(x_lane[:, None] + offs, mask=live[:, None] & (offs < bound), other=0)
    return tl.split(xw)


@triton.jit
def _x_step(x_lane, base, s: tl.constexpr, live, bound, SUB: tl.constexpr, EVEN_K: tl.constexpr):
    """`_x_words` of step s of a chunk whose lane-q words start at base: sub-chunk s // SPS, step s % SPS in it."""
    SPS: tl.constexpr = SUB // 16
    return _x_words(x_lane, base + ((s // SPS) * (SUB // 2) + 2 * (s % SPS)), live, bound, EVEN_K)


@triton.jit
def _x_chunk(x_lane, c, q, live, bound, CH: tl.constexpr, SUB: tl.constexpr, SPC: tl.constexpr,
             EVEN_K: tl.constexpr):
    """B fragments of chunk c's SPC steps (up to 8; unused ones repeat step 0): step s = sub-chunk j = s // SPS,
    step s' = s % SPS in it; lane q reads x at k = c CH + SUB j + 4 SPS q + 4 s' + 0..3 (layout.py)."""
    base = c * (CH // 2) + (2 * (SUB // 16)) * q  # in int32 words (bf16 pairs)
    x0, y0 = _x_step(x_lane, base, 0, live, bound, SUB, EVEN_K)
    x1, y1, x2, y2, x3, y3 = x0, y0, x0, y0, x0, y0
    x4, y4, x5, y5, x6, y6, x7, y7 = x0, y0, x0, y0, x0, y0, x0, y0
    if SPC > 1:
        x1, y1 = _x_step(x_lane, base, 1, live, bound, SUB, EVEN_K)
    if SPC > 2:
        x2, y2 = _x_step(x_lane, base, 2, live, bound, SUB, EVEN_K)
        x3, y3 = _x_step(x_lane, base, 3, live, bound, SUB, EVEN_K)
    if SPC > 4:
        x4, y4 = _x_step(x_lane, base, 4, live, bound, SUB, EVEN_K)
        x5, y5 = _x_step(x_lane, base, 5, live, bound, SUB, EVEN_K)
        x6, y6 = _x_step(x_lane, base, 6, live, bound, SUB, EVEN_K)
        x7, y7 = _x_step(x_lane, base, 7, live, bound, SUB, EVEN_K)
    return x0, y0, x1, y1, x2, y2, x3, y3, x4, y4, x5, y5, x6, y6, x7, y7


@triton.jit
def _pick(s: tl.constexpr, x0, y0, x1, y1, x2, y2, x3, y3, x4, y4, x5, y5, x6, y6, x7, y7):
    """The (b0, b1) pair of step s (compile time)."""
    if s == 0:
        return x0, y0
    elif s == 1:
        return x1, y1
    elif s == 2:
        return x2, y2
    elif s == 3:
        return x3, y3
    elif s == 4:
        return x4, y4
    elif s == 5:
        return x5, y5
    elif s == 6:
        return x6, y6
    else:
        return x7, y7


@triton.jit
def _flush(c0, c1, c2, c3, o0, o1, a0, a1, a2, a3, s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, grp, BIAS: tl.constexpr,
           HAS_MIN: tl.constexpr):
    """Add one group's sums of (bias + u) x, less BIAS times the group's sum of x (o0, o1: batch rows 2q, 2q + 1),
    times the group's scales of rows g and g + 8, to the float sums a0..a3; HAS_MIN: less the group's mins times
    the sum of x."""
    s0 = tl.load(s_ptrs0 + grp)
    s2 = tl.load(s_ptrs2 + grp)
    a0 += (c0 - BIAS * o0) * s0
    a1 += (c1 - BIAS * o1) * s0
    a2 += (c2 - BIAS * o0) * s2
    a3 += (c3 - BIAS * o1) * s2
    if HAS_MIN:
        m0 = tl.load(m_ptrs0 + grp)
        m2 = tl.load(m_ptrs2 + grp)
        a0 -= m0 * o0
        a1 -= m0 * o1
        a2 -= m2 * o0
        a3 -= m2 * o1
    return a0, a1, a2, a3


@triton.jit
def _kq_params(sub_ptrs, sup_ptrs, c, GPC: tl.constexpr, KQ: tl.constexpr):
    """K-quant scales of one row per lane: sub-block scale and min signed bytes (sc | m << 8, int16 [L, GPC])
    times the super-block's (d, dmin) (fp32 pairs): d * sc, dmin * m, exact in fp32."""
    v = tl.load(sub_ptrs[:, None] + (c * GPC + tl.arange(0, GPC)[None, :])).to(tl.int32)  # m's sign extended
    dm = tl.load(sup_ptrs[:, None] + (2 * ((c * GPC) // KQ) + tl.arange(0, 2)[None, :]))
    d, dmin = tl.split(dm)
    return ((v << 24) >> 24).to(tl.float32) * d[:, None], (v >> 8).to(tl.float32) * dmin[:, None]


@triton.jit
def _group_params(s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, c, GPC: tl.constexpr, HAS_MIN: tl.constexpr,
                  KQ: tl.constexpr = 0):
    """The scales (and mins) of rows g and g + 8 for chunk c's GPC scale groups, [L, GPC] each (loaded a chunk
    ahead, with the weight words). KQ > 0: s_ptrs* point at `_kq_params`' bytes, m_ptrs* at its (d, dmin)."""
    if KQ > 0:
        s0, m0 = _kq_params(s_ptrs0, m_ptrs0, c, GPC, KQ)
        s2, m2 = _kq_params(s_ptrs2, m_ptrs2, c, GPC, KQ)
    else:
        offs = c * GPC + tl.arange(0, GPC)[None, :]
        s0 = tl.load(s_ptrs0[:, None] + offs)
        s2 = tl.load(s_ptrs2[:, None] + offs)
        m0, m2 = s0, s2
        if HAS_MIN:
            m0 = tl.load(m_ptrs0[:, None] + offs)
            m2 = tl.load(m_ptrs2[:, None] + offs)
    return s0, s2, m0, m2


@triton.jit
def _chunk_params(s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, s3_off, m3_off, c, GPC: tl.constexpr, HAS_MIN: tl.constexpr,
                  KQ: tl.constexpr, GATED: tl.constexpr):
    """`_group_params` of chunk c for the weight and (gated) for w3, whose scales start s3_off / m3_off further on
    (without the gate, w3's are the weight's again)."""
    s0, s2, m0, m2 = _group_params(s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, c, GPC, HAS_MIN, KQ)
    t0, t2, n0, n2 = s0, s2, m0, m2
    if GATED:
        t0, t2, n0, n2 = _group_params(s_ptrs0 + s3_off, s_ptrs2 + s3_off, m_ptrs0 + m3_off, m_ptrs2 + m3_off, c,
                                       GPC, HAS_MIN, KQ)
    return s0, s2, m0, m2, t0, t2, n0, n2


@triton.jit
def _col(t, j: tl.constexpr, GPC: tl.constexpr):
    """Column j of t [L, GPC] (each lane holds its whole row: no shuffles)."""
    return tl.sum(tl.where(tl.arange(0, GPC)[None, :] == j, t, 0.0), axis=1)


@triton.jit
def _flush_pre(c0, c1, c2, c3, o0, o1, a0, a1, a2, a3, s0, s2, m0, m2, j: tl.constexpr, GPC: tl.constexpr,
               BIAS: tl.constexpr, HAS_MIN: tl.constexpr):
    """`_flush` with group j of the chunk's prefetched scales (and mins) [L, GPC]."""
    t0 = _col(s0, j, GPC)
    t2 = _col(s2, j, GPC)
    a0 += (c0 - BIAS * o0) * t0
    a1 += (c1 - BIAS * o1) * t0
    a2 += (c2 - BIAS * o0) * t2
    a3 += (c3 - BIAS * o1) * t2
    if HAS_MIN:
        n0 = _col(m0, j, GPC)
        n2 = _col(m2, j, GPC)
        a0 -= n0 * o0
        a1 -= n0 * o1
        a2 -= n2 * o0
        a3 -= n2 * o1
    return a0, a1, a2, a3


@triton.jit
def _flush_both(c0, c1, c2, c3, e0, e1, e2, e3, o0, o1, a0, a1, a2, a3, d0, d1, d2, d3, s_ptrs0, s_ptrs2, m_ptrs0,
                m_ptrs2, s3_off, grp, BIAS: tl.constexpr, GATED: tl.constexpr, HAS_MIN: tl.constexpr):
    """`_flush` of the weight's sums into a*, and of w3's (gated: scales and mins s3_off further) into d*."""
    a0, a1, a2, a3 = _flush(c0, c1, c2, c3, o0, o1, a0, a1, a2, a3, s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, grp, BIAS,
                            HAS_MIN)
    if GATED:
        d0, d1, d2, d3 = _flush(e0, e1, e2, e3, o0, o1, d0, d1, d2, d3, s_ptrs0 + s3_off, s_ptrs2 + s3_off,
                                m_ptrs0 + s3_off, m_ptrs2 + s3_off, grp, BIAS, HAS_MIN)
    return a0, a1, a2, a3, d0, d1, d2, d3


@triton.jit
def mma_linear_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr, M, N, K, n_chunks,
                      chunks_per_split, n_split, stride_xw, stride_wt, w3_tiles, stride_sn, stride_om,
                      stride_ps, stride_pm, stride_rm, BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr,
                      HAS_MIN: tl.constexpr, NW: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                      PARTIAL: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr, F16: tl.constexpr = False, ASM: tl.constexpr = True,
                      ss_out=None, SS: tl.constexpr = False, zero_ptr=None, ZERO: tl.constexpr = False,
                      SPLIT_MAX: tl.constexpr = 0, rs_ptr=None, rs_k=1, rs_eps=0.0, RS: tl.constexpr = False,
                      gx_g=None, gx_ptr=None, GX: tl.constexpr = False, PRE: tl.constexpr = False,
                      KQ: tl.constexpr = 0):
    """y[m, n] = sum_k x[m, k] w[n, k] (x bf16 [M, K], F16: fp16, rows stride_xw int32 words apart) for w in the
    fragment layout; grid (cdiv(M, 8), cdiv(tiles, NW), n_split), NW = the launch's num_warps.

    Warp v of program pid_n owns tile pid_n * NW + v (16 rows; tiles past the weight's are clamped to the last
    one and masked at the store), pid_m batch rows 8 pid_m .. 8 pid_m + 7, pid_k the chunks [pid_k *
    chunks_per_split, + chunks_per_split) (a chunk: 256 / BITS codes, one 16-byte load per lane, 3-bit: 128
    codes, and an 8-byte load of their high bits; chunks_per_split covers whole scale groups). w: int32 [tiles,
    n_chunks * CW] (`layout.fragment_chunk_words`), stride_wt its row stride. HAS_MIN: m_ptr holds
    mins shaped like the scales (w = scale * code - min). GATED: w3's tiles from tile w3_tiles on
    (their scales N rows down); y = silu(x w1^T) * (x w3^T).
    PARTIAL (split-K in one launch): fp32 partial sums to part[pid_k, m, :] (gated: w3's at column N + n), then
    the last program of the (pid_n, pid_m) tile (counter cnt[pid_m, pid_n]) reduces them (`common.finish_split`).
    HAS_RES, SS, ZERO, RS, GX, SPLIT_MAX as in `triton_int.int_gemv_kernel` (SS, ZERO, RS, GX: one batch row).
    PRE: each chunk's scales (and mins) are loaded a chunk ahead with its words, where a chunk holds whole scale
    groups; the launcher sets it for formats with mins (H100, whole frames: q4_k 210.4 -> 216.5 frames/s; q4_0
    unchanged, q2 293.2 -> 287.4 with it: bench/RESULTS.md, sixteenth session).
    KQ > 0: two-level K-quant scales (`layout.repack_int`): s_ptr holds int16 sub-block bytes (sc | m << 8), m_ptr
    fp32 (d, dmin) pairs, one per KQ groups; always loaded a chunk ahead (`_kq_params`).
    """
    pdl_start(PDL)
    zero_once(zero_ptr, ZERO)
    if RS:
        ss_in = tl.load(rs_ptr)  # loaded first, used last
    L: tl.constexpr = 32 * NW
    SPC: tl.constexpr = 8 if BITS == 3 else 16 // BITS  # k16 steps per chunk
    CH: tl.constexpr = 16 * SPC  # codes per chunk
    CW: tl.constexpr = CH * BITS // 2  # int32 words per chunk (layout.fragment_chunk_words)
    SUB: tl.constexpr = GROUP if GROUP < CH else CH  # codes whose k order is permuted together (layout.py)
    GS: tl.constexpr = GROUP // 16  # steps per scale group
    BIAS: tl.constexpr = 0.0 if F16 else 128.0 + OFF  # what a code pair carries above the code (`_code_pair`)
    pid_m = tl.program_id(0)  # batch tiles vary fastest: the programs reading one weight tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    i = tl.arange(0, L)
    lane = i % 32
    q = lane % 4
    g = lane // 4
    tile = pid_n * NW + i // 32
    row0 = tile * 16 + g  # rows of c0, c1; c2, c3 hold row0 + 8
    w_ptrs = (w_ptr + tl.minimum(tile, tl.cdiv(N, 16) - 1)[:, None].to(tl.int64) * stride_wt + lane[:, None] * 4
              + tl.arange(0, 4)[None, :])  # [L, 4]: one 16-byte load per lane
    w3_ptrs = w_ptrs + w3_tiles.to(tl.int64) * stride_wt
    h_ptrs = (w_ptr + tl.minimum(tile, tl.cdiv(N, 16) - 1)[:, None].to(tl.int64) * stride_wt + 128
              + lane[:, None] * 2 + tl.arange(0, 2)[None, :])  # [L, 2]: 3-bit codes' high bits, 8 bytes a lane
    h3_ptrs = h_ptrs + w3_tiles.to(tl.int64) * stride_wt
    s_ptrs0 = s_ptr + tl.minimum(row0, N - 1) * stride_sn
    s_ptrs2 = s_ptr + tl.minimum(row0 + 8, N - 1) * stride_sn
    stride_mn = stride_sn
    if KQ > 0:  # m_ptr: (d, dmin) pairs, one per KQ groups
        stride_mn = 2 * (stride_sn // KQ)
    m_ptrs0 = m_ptr + tl.minimum(row0, N - 1) * stride_mn
    m_ptrs2 = m_ptr + tl.minimum(row0 + 8, N - 1) * stride_mn
    s3_off = N * stride_sn
    m3_off = N * stride_mn
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, n_chunks)
    x_m = pid_m * 8 + g  # the lane's batch row in the B fragments
    x_live = x_m < M
    x_lane = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.minimum(x_m, M - 1).to(tl.int64) * stride_xw
    bound = K // 2
    ones = tl.full([L], 0x3C003C00 if F16 else 0x3F803F80, tl.int32)  # the pair (1, 1)
    zf = tl.zeros([L], tl.float32)
    c0, c1, c2, c3 = zf, zf, zf, zf  # the group's sums of w1 (or the only weight)
    e0, e1, e2, e3 = zf, zf, zf, zf  # ... of w3 (gated)
    o0, o1 = zf, zf  # ... of x (the ones tile: batch columns 2q, 2q + 1; its rows g + 8 repeat them)
    a0, a1, a2, a3 = zf, zf, zf, zf  # scaled float sums
    d0, d1, d2, d3 = zf, zf, zf, zf
    # register double buffering: chunk c + 1's words and x load while chunk c computes (triton's shared-memory
    # pipeline, unrolled steps of 2-8 chunks and weight words two chunks ahead were no faster at the splits the
    # launcher picks: bench/RESULTS.md, twelfth session)
    words = tl.load(w_ptrs + c_start * CW)
    words3 = words
    if GATED:
        words3 = tl.load(w3_ptrs + c_start * CW)
    highs, highs3 = words, words  # 3-bit: the high-bit words [L, 2]
    if BITS == 3:
        highs = tl.load(h_ptrs + c_start * CW)
        highs3 = highs
        if GATED:
            highs3 = tl.load(h3_ptrs + c_start * CW)
    (x0, y0, x1, y1, x2, y2, x3, y3, x4, y4, x5, y5, x6, y6, x7,
     y7) = _x_chunk(x_lane, c_start, q, x_live, bound, CH, SUB, SPC, EVEN_K)
    GPC: tl.constexpr = SPC // GS if GS <= SPC else 1  # scale groups per chunk
    PRE_S: tl.constexpr = (PRE or KQ > 0) and GS <= SPC
    if PRE_S:
        sc0, sc2, mn0, mn2, sd0, sd2, md0, md2 = _chunk_params(s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, s3_off, m3_off,
                                                               c_start, GPC, HAS_MIN, KQ, GATED)
    for c in range(c_start, c_end):
        cn = tl.minimum(c + 1, c_end - 1)
        nwords = tl.load(w_ptrs + cn * CW)
        nwords3 = nwords
        if GATED:
            nwords3 = tl.load(w3_ptrs + cn * CW)
        nhighs, nhighs3 = highs, highs3
        if BITS == 3:
            nhighs = tl.load(h_ptrs + cn * CW)
            nhighs3 = nhighs
            if GATED:
                nhighs3 = tl.load(h3_ptrs + cn * CW)
        if PRE_S:
            nsc0, nsc2, nmn0, nmn2, nsd0, nsd2, nmd0, nmd2 = _chunk_params(
                s_ptrs0, s_ptrs2, m_ptrs0, m_ptrs2, s3_off, m3_off, cn, GPC, HAS_MIN, KQ, GATED)
        (n0, m0, n1, m1, n2, m2, n3, m3, n4, m4, n5, m5, n6, m6, n7,
         m7) = _x_chunk(x_lane, cn, q, x_live, bound, CH, SUB, SPC, EVEN_K)
        w02, w13 = tl.split(tl.reshape(words, (L, 2, 2)))  # split takes the last dim: words (0, 2), (1, 3)
        w0, w2 = tl.split(w02)
        w1, w3 = tl.split(w13)
        v02, v13 = tl.split(tl.reshape(words3, (L, 2, 2)))
        v0, v2 = tl.split(v02)
        v1, v3 = tl.split(v13)
        hk0, hk1 = w0, w2  # the high-bit words of kk = 0 and 1 (3-bit), else unused
        hv0, hv1 = v0, v2
        if BITS == 3:
            hk0, hk1 = tl.split(highs)
            hv0, hv1 = tl.split(highs3)
        for s in tl.static_range(SPC):
            b0, b1 = _pick(s, x0, y0, x1, y1, x2, y2, x3, y3, x4, y4, x5, y5, x6, y6, x7, y7)
            c0, c1, c2, c3 = _mma(_code_pair(w0, hk0, s, 0, BITS, OFF, F16, ASM),
                                  _code_pair(w1, hk0, s, 1, BITS, OFF, F16, ASM),
                                  _code_pair(w2, hk1, s, 0, BITS, OFF, F16, ASM),
                                  _code_pair(w3, hk1, s, 1, BITS, OFF, F16, ASM), b0, b1, c0, c1, c2, c3, F16, ASM)
            if GATED:
                e0, e1, e2, e3 = _mma(_code_pair(v0, hv0, s, 0, BITS, OFF, F16, ASM),
                                      _code_pair(v1, hv0, s, 1, BITS, OFF, F16, ASM),
                                      _code_pair(v2, hv1, s, 0, BITS, OFF, F16, ASM),
                                      _code_pair(v3, hv1, s, 1, BITS, OFF, F16, ASM), b0, b1, e0, e1, e2, e3, F16,
                                      ASM)
            if not F16 or HAS_MIN:  # sum of x per batch column: for the 128 + OFF of the bf16 pairs, the mins
                o0, o1, _o2, _o3 = _mma(ones, ones, ones, ones, b0, b1, o0, o1, zf, zf, F16, ASM)
            if PRE_S:
                if (s + 1) % GS == 0:
                    a0, a1, a2, a3 = _flush_pre(c0, c1, c2, c3, o0, o1, a0, a1, a2, a3, sc0, sc2, mn0, mn2,
                                                s // GS, GPC, BIAS, HAS_MIN)
                    if GATED:
                        d0, d1, d2, d3 = _flush_pre(e0, e1, e2, e3, o0, o1, d0, d1, d2, d3, sd0, sd2, md0, md2,
                                                    s // GS, GPC, BIAS, HAS_MIN)
                    c0, c1, c2, c3, e0, e1, e2, e3, o0, o1 = zf, zf, zf, zf, zf, zf, zf, zf, zf, zf
            elif GS <= SPC:  # a scale group ends inside the chunk: known at compile time
                if (s + 1) % GS == 0:
                    a0, a1, a2, a3, d0, d1, d2, d3 = _flush_both(
                        c0, c1, c2, c3, e0, e1, e2, e3, o0, o1, a0, a1, a2, a3, d0, d1, d2, d3, s_ptrs0, s_ptrs2,
                        m_ptrs0, m_ptrs2, s3_off, (c * CH + 16 * s) // GROUP, BIAS, GATED, HAS_MIN)
                    c0, c1, c2, c3, e0, e1, e2, e3, o0, o1 = zf, zf, zf, zf, zf, zf, zf, zf, zf, zf
        if GS > SPC:  # groups span several chunks: this one may end one
            if (c + 1) % (GS // SPC) == 0:
                a0, a1, a2, a3, d0, d1, d2, d3 = _flush_both(
                    c0, c1, c2, c3, e0, e1, e2, e3, o0, o1, a0, a1, a2, a3, d0, d1, d2, d3, s_ptrs0, s_ptrs2,
                    m_ptrs0, m_ptrs2, s3_off, c // (GS // SPC), BIAS, GATED, HAS_MIN)
                c0, c1, c2, c3, e0, e1, e2, e3, o0, o1 = zf, zf, zf, zf, zf, zf, zf, zf, zf, zf
        words = nwords
        words3 = nwords3
        highs = nhighs
        highs3 = nhighs3
        if PRE_S:
            sc0, sc2, mn0, mn2, sd0, sd2, md0, md2 = nsc0, nsc2, nmn0, nmn2, nsd0, nsd2, nmd0, nmd2
        x0, y0, x1, y1, x2, y2, x3, y3 = n0, m0, n1, m1, n2, m2, n3, m3
        x4, y4, x5, y5, x6, y6, x7, y7 = n4, m4, n5, m5, n6, m6, n7, m7
    # [L] sums -> [L, 2 (row g, g + 8), 2 (batch row 2q, 2q + 1)]; each lane stores its own four
    y = tl.join(tl.join(a0, a1), tl.join(a2, a3))
    y3 = tl.join(tl.join(d0, d1), tl.join(d2, d3))
    rows = tl.join(tl.join(row0, row0), tl.join(row0 + 8, row0 + 8))
    cols = pid_m * 8 + 2 * q
    cols = tl.join(tl.join(cols, cols + 1), tl.join(cols, cols + 1))
    mask = (rows < N) & (cols < M)
    if RS:
        rs = rs_scale(ss_in, rs_k, rs_eps)
        y = y * rs
        y3 = y3 * rs
    g_ptrs = r_ptr + cols * stride_rm + rows  # (not read without GX)
    gx_ptrs = g_ptrs
    if GX:
        g_ptrs = gx_g + rows
        gx_ptrs = gx_ptr + cols * stride_om + rows
    if PARTIAL:
        finish_split(y, y3, cols * stride_pm + rows, mask, part_ptr, pid_k, stride_ps, N,
                     cnt_ptr + pid_m * tl.num_programs(1) + pid_n, n_split, out_ptr + cols * stride_om + rows,
                     r_ptr + cols * stride_rm + rows, GATED, HAS_RES, ss_out, SS, SPLIT_MAX, g_ptrs, gx_ptrs, GX)
    else:
        if GATED:
            y = y * tl.sigmoid(y) * y3
        store_output(out_ptr + cols * stride_om + rows, y, mask, r_ptr + cols * stride_rm + rows, HAS_RES, ss_out,
                     SS, g_ptrs, gx_ptrs, GX)
