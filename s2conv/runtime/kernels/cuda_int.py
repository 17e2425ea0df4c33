"""A hand-written CUDA GEMV (one row of x) for 2-, 3- and 4-bit codes in the interleaved layout of `layout.py` (q4,
q4_0, q3, q2, tq2_0), compiled at load time by NVRTC; the integer launcher takes it where `takes` says so, the Triton
kernels everywhere else.

Why CUDA beside Triton: the integer GEMV is latency-bound (a q4 layer took ~36 us against ~20 us for a kernel that
only loads the same bytes). In the Triton kernel, a program walks its blocks one after another with a block or
two of words in flight and prepares x for its whole row. Here every warp owns one 512-code block of a 16-row
tile (the thread block), requests all of that block's weight words and scales at once (2 * bits 16-byte loads a
lane, twice that when gated; the 16 rows' scales in one coalesced load, handed to the lanes that use them by
shuffles later), then prepares only its own block's x while those are in flight:
1. x of the block as 16-bit integers round(x * inv), inv = XMAX / max |x| over the block (a per-block scale,
   found by warp shuffles: no wait on other warps), stored in shared memory in the order of a word's fields, so
   16-byte loads give the x integers that a word's codes meet; per integer dot (below) also the bias
   0x4B400000 - OFF * sum(its x integers) (the code offset's correction);
2. per two words of a scale group (q4), or per 2-bit word and scale group (2-bit; 3-bit: the 2-bit word's low bits
   ORed with the 1-bit word's high bits, shifted into place, so a code is again one byte): dp2a (two multiply-adds
   each) starting from the bias; the float with the result's bits minus 2**23 + 2**22 is the exact integer dot
   (`triton_int`'s trick), times the group scale / inv. q4_0's 32-code groups: a lane loads 8 consecutive words
   of its rows instead (a group's codes lie 2 a word across 16 words), so its 16 codes of each of 4 groups add up
   in one integer before their one conversion and scale, and it reads those scales itself (no shuffles);
3. the row sums over lanes (shuffles) and warps (one barrier), then warp 0's epilogue: the RMSNorm factor (a
   folded norm, or the chain's rs_in), silu(w1) * w3 when gated, the residual, the chain's outputs.

On Hopper and later, a GEMV captured into a CUDA graph right after another kernel goes out with programmatic
dependent launch (PDL, `cuda_common`): it starts while its producer still runs and waits (griddepcontrol.wait)
before it reads x; its weight loads go out before the wait (pinned there, `cuda_common.pdl_wait`: ptxas would
otherwise schedule them after it). Each GEMV lets its successor launch first thing, so
consecutive GEMVs overlap one's tail with the next one's start.

H200, S2's shapes (bench/RESULTS.md, eighteenth session): wqkv with its norm 6.6 us against 6.7 for the Triton
GEMV without it, wo 6.0 against 6.3, w1|w3 12.6 against 13.9; at K = 9728 (w2) 11.3 against 9.2. Without PDL,
K above 4096 stays on Triton (`max_k`); with it, whole q4 frames on an H100 went 300.1 -> 312.5 frames/s with
every GEMV here, q3 277.3 -> 318.3 (nineteenth session). Loading the scales coalesced (one load a lane,
rather than each lane its own 4 rows' scales in up to 8 loads): q4 314.2 -> 328.6, q3 314.3 -> 345.2, q2 318.4 ->
365.1, tq2_0 411.0 -> 420.3 (twentieth session). CI has no GPU: the tests compile every variant for
sm_90 with nvcc where it is installed, and the GPU tests check the kernel against the reference path,
graph-replayed with PDL as well.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from s2conv.runtime.kernels.cuda_common import STORE_ROWS, CudaGemv, available, flags_source, pdl_capable
from s2conv.runtime.kernels.launch import launch, recording_active

EPILOGUE = r"""  // after the row sums are in sums[warp][HALVES][16]: warp 0 finishes the tile's rows
    if (tid >= 32) return;
    // the epilogue, lane r of warp 0 for row row0 + r: RMSNorm factor, gate, rounding, + residual (rounded again,
    // as eager h + linear(x)); GX: the output times the next norm's weight too; SS: its sum of squares
    const bool live = lane < 16 && row0 + lane < N;
    float out_scale = 1.f;
#if NORM
    float sq_all = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sq_all += sq_warp[w];
    out_scale = rsqrtf(sq_all / K + (float)eps);
#elif RS
    out_scale = rsqrtf(ld_fresh(rs_in) / K + (float)eps);
#endif
    float o = 0.f;
    if (live) {
        float t[HALVES];
#pragma unroll
        for (int h = 0; h < HALVES; ++h) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) s += sums[w * HALVES * 16 + h * 16 + lane];
            t[h] = s * out_scale;
        }
""" + STORE_ROWS

SOURCE = r"""  // after cuda_common.PRELUDE
// the 4 codes' products of one 4-bit word (fields 0..7 at byte i % 4, nibble i / 4) with x pairs xv, from c
__device__ __forceinline__ int dot_word(unsigned w, int4 xv, int c) {
    unsigned lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
    c = dp2a_lo(xv.x, lo, c);
    c = dp2a_hi(xv.y, lo, c);
    c = dp2a_lo(xv.z, hi, c);
    return dp2a_hi(xv.w, hi, c);
}
__device__ __forceinline__ float exact(int biased) { return __int_as_float(biased) - 12582912.0f; }
__device__ __forceinline__ int comp(int4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// One thread block per 16-row tile of the output; warp w takes 512-code block w of the tile's rows, so
// blockDim = 32 * n_blocks. A warp load covers 8 consecutive words of the 16 rows (512 contiguous bytes): lane l
// holds word l / 4 of rows 4 (l % 4) .. + 3, word WORD(u) of the block at load u (u * 8 + l / 4; q4_0:
// 8 (l / 4) + u) (NLOAD = 2 BITS loads: a block is 16 BITS words a row, `layout.pack_int_codes`).
// qw: int32 words [HALVES * n_pad, W]; scales fp32 (fp16 with HALF_S) [HALVES * N, stride_s], one per GROUP codes
// (SPB per block);
// x, res, y, g, gx_*: the activations' 16-bit dtype. Shared memory, per warp: its block's x integers in the order
// of the words' fields (4-bit: [64 words][8] u16; 2- and 3-bit: [32 two-bit words][16] u16, the 1-bit words of
// 3-bit codes meet the same x) and the bias of each integer dot [BIASES]; then the warps' row sums
// [WARPS][HALVES * 16].
// x is scaled to integers per block (inv = XMAX / max |x| over the block's 512 codes), so a warp prepares its
// own x without waiting on the other warps: the one block-wide barrier is before the final sums.
#define HALVES (GATED ? 2 : 1)
#define NLOAD (2 * BITS)
#define SPB (512 / GROUP)
#define GPW (256 / GROUP)  // 2- and 3-bit: scale groups a two-bit word's 16 fields (slots) span
#define LANE_GROUPS (BITS == 4 && GROUP == 32)  // q4_0: a lane's words hold 16 codes of each of its groups
#define BIASES (BITS == 4 ? (LANE_GROUPS ? 32 : 64) : 32 * GPW)
#define SPL (SPB / 2)  // scales a lane loads
#if LANE_GROUPS
// lane l takes words 8 (l / 4) + u (u = 0..7) of its rows: fields 2 p and 2 p + 1 of those 8 words are 16 codes of
// scale group 4 (l / 8) + p, so each (row, group) dot is one integer over 16 codes and the lane reads its own scales
#define WORD(u) (8 * (lane >> 2) + (u))
// where row 4 q + r's scales of the lane's groups 4 (l / 8) .. + 3 start
#define SG_AT(h, r) ((long long)((h) * N + min(row0 + 4 * q + (r), N - 1)) * stride_s + SPB * b + 4 * (lane >> 3))
#else
#define WORD(u) ((u) * 8 + lane / 4)  // a warp load covers 8 consecutive words
#endif
// the scale of group i (of the block's SPB) for row 4 q + r, from the lane that loaded it: a warp loads its 16
// rows' scales coalesced, SPL a lane, rather than each lane its 4 rows' (4 SPB scales, 4 rows a load)
#define SCALE(h, r, i) __shfl_sync(0xffffffffu, scl[h][(i) % SPL], 2 * (4 * q + (r)) + (i) / SPL)

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) s2_int_gemv(
        const int4* __restrict__ qw, const float* __restrict__ scales, const u16* __restrict__ x,
        u16* __restrict__ y, const u16* __restrict__ res, const u16* __restrict__ g,
        float* ss_out, float* zero, const u16* __restrict__ gx_g, u16* __restrict__ gx_buf, const float* rs_in,
        int N, int K, int W, int n_pad, int stride_s, double eps, double xmax) {
    extern __shared__ int4 smem[];
#if NORM
    __shared__ float sq_warp[WARPS];  // the warps' sums of squares of x (the folded RMSNorm's statistic)
    float sq = 0.f;
#endif
    const int tid = threadIdx.x, lane = tid & 31, b = tid >> 5, q = lane & 3;
    const int row0 = blockIdx.x * 16;
    int4* xs = smem + b * 64;
    int* bias = (int*)(smem + WARPS * 64) + b * BIASES;
    float* sums = (float*)((int*)(smem + WARPS * 64) + WARPS * BIASES);
    // 1. this warp's weight words and scales, all requested first
    pdl_launch_dependents();  // the next GEMV may start its own weight loads while this one runs
    const int4* wbase = qw + (long long)blockIdx.x * 4 * W + q;
    int4 wr[HALVES][NLOAD];
#if LANE_GROUPS && HALF_S
    uint2 sg[HALVES][4];  // row 4 q + r's scales of groups 4 (l / 8) .. + 3: 4 halves (fp32 ones: read at use, as
                          // the registers hold no more beside the gated kernel's words)
#elif !LANE_GROUPS
    float scl[HALVES][SPL];  // the block's scales of row row0 + lane / 2, half lane % 2 (SCALE hands them out)
#endif
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
        for (int u = 0; u < NLOAD; ++u)
            wr[h][u] = ld_stream(wbase + h * ((long long)n_pad * W / 4) + 4 * (b * 16 * BITS + WORD(u)));
#if LANE_GROUPS
#if HALF_S
#pragma unroll
        for (int r = 0; r < 4; ++r) sg[h][r] = *(const uint2*)((const u16*)scales + SG_AT(h, r));
#endif
#else
        const long long s_at = (long long)(h * N + min(row0 + lane / 2, N - 1)) * stride_s + SPB * b
                             + (lane & 1) * SPL;
#if HALF_S  // fp16 scales: SPL halves in one load (8, 4 or 2 bytes), each to a float
        const u16* sh = (const u16*)scales + s_at;
#if SPL == 4
        const int2 u = *(const int2*)sh;
        const int uw[2] = {u.x, u.y};
#pragma unroll
        for (int j = 0; j < 4; ++j) scl[h][j] = half_to_f((u16)(uw[j / 2] >> (16 * (j % 2))));
#elif SPL == 2
        const unsigned u = *(const unsigned*)sh;
        scl[h][0] = half_to_f((u16)u);
        scl[h][1] = half_to_f((u16)(u >> 16));
#else
        scl[h][0] = half_to_f(*sh);
#endif
#else
        const float* sl = scales + s_at;
#if SPL == 4
        const float4 s4 = *(const float4*)sl;
        scl[h][0] = s4.x;
        scl[h][1] = s4.y;
        scl[h][2] = s4.z;
        scl[h][3] = s4.w;
#elif SPL == 2
        const float2 s2 = *(const float2*)sl;
        scl[h][0] = s2.x;
        scl[h][1] = s2.y;
#else
        scl[h][0] = *sl;
#endif
#endif
#endif
    }
#if NORM
    // the norm weight's 16 values at this lane's slot of x (k = 512 b + 16 l + e), a constant too
    const int4 gr[2] = {*(const int4*)(g + b * 512 + 16 * lane), *(const int4*)(g + b * 512 + 16 * lane + 8)};
#endif
    pdl_wait();  // everything above read constants only; x, res, rs_in and every write come after the producer
#if ZERO
    if (tid == 0 && blockIdx.x == 0) *zero = 0.f;  // a consumed sum-of-squares slot, free for the next step
#endif
    // 2. the block's x: lane l takes the 16 codes of slot l (k = 512 b + 16 l + e), the block's max |x| by
    // shuffles, the integers stored where the words' fields meet them (4-bit: field l % 8 of word 16 (l / 8) + e;
    // 2-bit words: field l % 16 of word 16 (l / 16) + e); then the bias of each integer dot
    // (K is a whole number of blocks and x is 16-byte aligned: `aligned`)
    const int k0 = b * 512 + 16 * lane;  // below K: a launch has one warp per block of K (`aligned`)
#if X_GUARD
    // a guard that never fails, kept where its removal measured slower (q2 frames -5%, q3 -0.5% on an H100,
    // though it costs ~32 instructions; cause not found): it changes how ptxas schedules what follows
    int4 xr[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};
    if (k0 < K) {
        xr[0] = ld_fresh((const int4*)(x + k0));
        xr[1] = ld_fresh((const int4*)(x + k0 + 8));
    }
#else
    const int4 xr[2] = {ld_fresh((const int4*)(x + k0)), ld_fresh((const int4*)(x + k0 + 8))};
#endif
    const u16* xh = (const u16*)xr;
    float v[16], amax = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        v[e] = x_to_f(xh[e]);
#if NORM
        sq += v[e] * v[e];
        v[e] *= x_to_f(((const u16*)gr)[e]);
#endif
        amax = fmaxf(amax, fabsf(v[e]));
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float inv = amax > 0.f ? (float)xmax / amax : 0.f, rinv = amax > 0.f ? amax / (float)xmax : 0.f;
    u16* xq = (u16*)xs;
#if BITS == 4
#pragma unroll
    for (int e = 0; e < 16; ++e) xq[((lane >> 3) * 16 + e) * 8 + (lane & 7)] = (u16)(short)__float2int_rn(v[e] * inv);
    __syncwarp();
#if LANE_GROUPS
    {  // bias 4 m + p (lane i = 4 m + p): fields 2 p, 2 p + 1 of words 8 m .. 8 m + 7, the lanes 4 m .. 4 m + 3's
        // 16 codes of group p of their octet
        int s = 0;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int a = ((const int*)xs)[(8 * (lane >> 2) + u) * 4 + (lane & 3)];
            s += (short)(a & 0xffff) + (a >> 16);
        }
        bias[lane] = 0x4B400000 - OFF * s;
    }
#else
#pragma unroll
    for (int j = lane; j < 64; j += 32) {
        int4 p = xs[j];
        int s = (short)(p.x & 0xffff) + (p.x >> 16) + (short)(p.y & 0xffff) + (p.y >> 16)
              + (short)(p.z & 0xffff) + (p.z >> 16) + (short)(p.w & 0xffff) + (p.w >> 16);
        bias[j] = 0x4B400000 - OFF * s;
    }
#endif
#else
#pragma unroll
    for (int e = 0; e < 16; ++e) xq[((lane >> 4) * 16 + e) * 16 + (lane & 15)] = (u16)(short)__float2int_rn(v[e] * inv);
    __syncwarp();
    {  // lane j: two-bit word j's 16 x integers, summed per scale group (16 / GPW fields each)
        const int4 p0 = xs[2 * lane], p1 = xs[2 * lane + 1];
        const int pr[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
        for (int gi = 0; gi < GPW; ++gi) {
            int s = 0;
#pragma unroll
            for (int p = gi * 8 / GPW; p < (gi + 1) * 8 / GPW; ++p) s += (short)(pr[p] & 0xffff) + (pr[p] >> 16);
            bias[lane * GPW + gi] = 0x4B400000 - OFF * s;
        }
    }
#endif
    __syncwarp();
    // 3. the dot products, 4 rows a lane: each integer dot (codes of one scale group) is exact, then times its
    // scale
    float acc[HALVES][4] = {};
#if LANE_GROUPS
    {
        // the lane's words 8 (l / 4) + u: fields 2 p, 2 p + 1 (one dp2a) are 2 of the 16 codes of group 4 (l / 8) + p
        // it holds, so each (row, group) dot adds up over all 8 words before its one conversion and scale
        const int4 b4 = ((const int4*)bias)[lane >> 2];
        int c[HALVES][4][4];
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                c[h][r][0] = b4.x;
                c[h][r][1] = b4.y;
                c[h][r][2] = b4.z;
                c[h][r][3] = b4.w;
            }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int4 xv = xs[WORD(u)];
#pragma unroll
            for (int h = 0; h < HALVES; ++h)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const unsigned w = (unsigned)comp(wr[h][u], r);
                    const unsigned lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
                    c[h][r][0] = dp2a_lo(xv.x, lo, c[h][r][0]);
                    c[h][r][1] = dp2a_hi(xv.y, lo, c[h][r][1]);
                    c[h][r][2] = dp2a_lo(xv.z, hi, c[h][r][2]);
                    c[h][r][3] = dp2a_hi(xv.w, hi, c[h][r][3]);
                }
        }
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
#if HALF_S
                const float s0 = half_to_f((u16)sg[h][r].x), s1 = half_to_f((u16)(sg[h][r].x >> 16));
                const float s2 = half_to_f((u16)sg[h][r].y), s3 = half_to_f((u16)(sg[h][r].y >> 16));
#else
                const float4 sf = *(const float4*)(scales + SG_AT(h, r));
                const float s0 = sf.x, s1 = sf.y, s2 = sf.z, s3 = sf.w;
#endif
                acc[h][r] = exact(c[h][r][0]) * s0 + exact(c[h][r][1]) * s1 + exact(c[h][r][2]) * s2
                          + exact(c[h][r][3]) * s3;
            }
    }
#elif BITS == 4
#pragma unroll
    for (int v = 0; v < 4; ++v) {  // words 16 v + l / 4 and 16 v + 8 + l / 4 (loads 2 v, 2 v + 1): scale group v
        const int j = 16 * v + lane / 4;
        const int4 xa = xs[j], xb = xs[j + 8];
        const int b0 = bias[j] + bias[j + 8] - 0x4B400000;  // one integer dot over both words (`exact_xmax`)
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int c = dot_word((unsigned)comp(wr[h][2 * v], r), xa, b0);
                acc[h][r] += exact(dot_word((unsigned)comp(wr[h][2 * v + 1], r), xb, c)) * SCALE(h, r, v);
            }
    }
#else
    // two-bit word (t, w) = load 2 t + w / 8 holds fields i of slots 16 t + i (i = 0..15) at bit 8 (i % 4) + 2 (i / 4);
    // 3-bit: the high bits, the one-bit word w = load 4 + w / 8, hold slot s at bit 8 (s % 4) + s / 4
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        float st[HALVES][4][GPW];  // the scale groups of slots 16 t .. 16 t + 15
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int gi = 0; gi < GPW; ++gi) st[h][r][gi] = SCALE(h, r, t * GPW + gi);
        // the lane's two-bit words 16 t + l / 4 (hw = 0) and 16 t + 8 + l / 4 (hw = 1) meet the same scale groups:
        // one integer dot per group over both (its sum exact: `exact_xmax`), one conversion
        int xp[2][8];
        int b0[GPW];
#pragma unroll
        for (int hw = 0; hw < 2; ++hw) {
            const int j = 16 * t + 8 * hw + lane / 4;  // the two-bit word, 0..31
            const int4 xa = xs[2 * j], xb = xs[2 * j + 1];
            xp[hw][0] = xa.x; xp[hw][1] = xa.y; xp[hw][2] = xa.z; xp[hw][3] = xa.w;
            xp[hw][4] = xb.x; xp[hw][5] = xb.y; xp[hw][6] = xb.z; xp[hw][7] = xb.w;
        }
#pragma unroll
        for (int gi = 0; gi < GPW; ++gi)
            b0[gi] = bias[(16 * t + lane / 4) * GPW + gi] + bias[(16 * t + 8 + lane / 4) * GPW + gi] - 0x4B400000;
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                int c[GPW];
#pragma unroll
                for (int gi = 0; gi < GPW; ++gi) c[gi] = b0[gi];
#pragma unroll
                for (int hw = 0; hw < 2; ++hw) {
                    const unsigned lo = (unsigned)comp(wr[h][2 * t + hw], r);
#if BITS == 3
                    const unsigned hi = (unsigned)comp(wr[h][4 + hw], r);
#endif
#pragma unroll
                    for (int e = 0; e < 4; ++e) {  // fields 4 e .. 4 e + 3, in scale group e * GPW / 4
                        unsigned codes = (lo >> (2 * e)) & 0x03030303u;
#if BITS == 3
                        codes |= ((hi >> (4 * t + e)) & 0x01010101u) << 2;
#endif
                        const int gi = e * GPW / 4;
                        c[gi] = dp2a_lo(xp[hw][2 * e], codes, c[gi]);
                        c[gi] = dp2a_hi(xp[hw][2 * e + 1], codes, c[gi]);
                    }
                }
#pragma unroll
                for (int gi = 0; gi < GPW; ++gi) acc[h][r] += exact(c[gi]) * st[h][r][gi];
            }
    }
#endif
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[h][r] *= rinv;  // x's integers back to x's scale
    // 4. sums over the 8 lanes of a row quad, then (after the barrier) over the warps, by warp 0
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[h][r] += __shfl_xor_sync(0xffffffffu, acc[h][r], o);
    }
#if NORM
#pragma unroll
    for (int o = 16; o; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (lane == 0) sq_warp[b] = sq;
#endif
    if (lane < 4)
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) sums[b * HALVES * 16 + h * 16 + 4 * lane + r] = acc[h][r];
    __syncthreads();
""" + EPILOGUE


@dataclass(frozen=True)
class Variant:
    """One compiled specialization: warps (= 512-code blocks of K), code bits, codes per scale, gated, residual,
    folded RMSNorm, norm chain flags (`ops.norm_chain_args`), fp16 x (else bf16), the code offset, thread blocks per
    SM the registers must allow (__launch_bounds__), the PDL prologue (sm_90+, `pdl_capable`), fp16 scales (else
    fp32: `layout.repack_int`)."""

    warps: int
    bits: int = 4
    group: int = 128
    gated: bool = False
    has_res: bool = False
    norm: bool = False
    ss: bool = False
    zero: bool = False
    gx: bool = False
    rs: bool = False
    fp16: bool = False
    offset: int = 8
    min_blocks: int = 1
    pdl: bool = False
    half_scales: bool = False

    def source(self) -> str:
        flags = dict(WARPS=self.warps, BITS=self.bits, GROUP=self.group, GATED=self.gated, HAS_RES=self.has_res,
                     NORM=self.norm, SS=self.ss, ZERO=self.zero, GX=self.gx, RS=self.rs, XF16=self.fp16,
                     OFF=self.offset, MINB=self.min_blocks, PDL=self.pdl, HALF_S=self.half_scales,
                     X_GUARD=self.bits < 4 and self.group < 256)  # q2, q3: see the kernel
        return flags_source(flags, SOURCE)


def max_blocks(gated: bool) -> int:
    """The most 512-code blocks of K (one warp each) a thread block keeps in registers without spilling (sm_90):
    24 (768 threads), gated 16 (`tests/test_cuda_int.py` compiles both limits)."""
    return 16 if gated else 24


def min_blocks(gated: bool, warps: int) -> int:
    """__launch_bounds__'s blocks per SM: gated (2 x 8 words a lane in registers), 3 where that leaves the
    registers room (<= 5 warps: 128 a thread), so w1|w3's 608 tiles run in fewer waves (H200 probe: 18.0 ->
    12.6 us); else what the registers allow."""
    return 3 if gated and warps <= 5 else 1


def takes(x: torch.Tensor, bits: int, group: int, has_min: bool, k: int, gated: bool) -> bool:
    """Whether `int_gemv` takes this linear (`ops.int_linear_impl` asks, for a weight in the interleaved layout):
    `available(x)`, codes without mins, 4-bit ones in groups of 32 or 128 (q4_0, q4), 2- and 3-bit ones in groups of
    64, 128 or 256 (q2, q3, tq2_0), K of at most `max_k`."""
    return (available(x) and not has_min
            and (group in (32, 128) if bits == 4 else bits in (2, 3) and group in (64, 128, 256))
            and 0 < k <= min(max_k(x.device), max_blocks(gated) * 512))


def max_k(device: torch.device) -> int:
    """S2CONV_CUDA_GEMV_MAX_K, by default every K the registers allow where the GEMVs go out with PDL, else 4096.
    Measured on an H100 (bench/RESULTS.md, eighteenth and nineteenth sessions): without PDL, Triton's split-K GEMV
    was the faster one at K = 9728 (S2's w2; whole q4 frames 291.9 frames/s with every K here, 296.8 with 4096);
    with PDL every K here is faster (312.5 against 302.9), since w2 then overlaps its neighbours."""
    default = 1 << 20 if pdl_capable(device) else 4096
    return int(os.environ.get("S2CONV_CUDA_GEMV_MAX_K", default))


def aligned(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int = 128,
            norm_weight: torch.Tensor | None = None) -> bool:
    """The memory layout the kernel's loads assume: K a whole number of 512-code blocks with a scale for every
    group of them (a lane reads 16 x values at once, unmasked), contiguous x and qweight, both 16-byte aligned, and
    scales whose rows split into whole vectors of 256 / group floats (a lane loads half a block's scales of one row
    at once: 4 for 64-code groups, 2 for 128, 1 for 256; q4_0's fp16 scales 4 at a time, checked as 8), and a
    folded norm's weight contiguous, 16-byte aligned and in x's dtype (read like x)."""
    vec = 256 // group if scales.dtype == torch.float16 else min(4, 256 // group)
    return (x.shape[1] % 512 == 0 and scales.shape[1] * group >= x.shape[1] and x.is_contiguous()
            and qweight.is_contiguous() and scales.stride(1) == 1 and scales.stride(0) % vec == 0
            and scales.data_ptr() % (scales.element_size() * vec) == 0 and qweight.data_ptr() % 16 == 0
            and x.data_ptr() % 16 == 0
            and (norm_weight is None or (norm_weight.is_contiguous() and norm_weight.data_ptr() % 16 == 0
                                         and norm_weight.dtype == x.dtype)))


def exact_xmax(bits: int, offset: int, group: int) -> int:
    """The largest x integer range 2**b - 1 (b <= 15) under which every integer dot the kernel converts stays
    below 2**22 (`exact`): 16 codes for 4-bit ones (q4: a lane's two words of a group; q4_0: two fields of a lane's
    8 words), and for 2- and 3-bit codes a group's fields in both of a lane's words, 2 * group / 16."""
    codes = 16 if bits == 4 else 2 * min(group // 16, 16)
    bound = (2**22 - 1) // (codes * max(offset, (1 << bits) - 1 - offset))
    return 2 ** min(15, (bound + 1).bit_length() - 1) - 1


GEMV = CudaGemv("s2_int_gemv")


def int_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, gated: bool = False,
             residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
             ss_out: torch.Tensor | None = None, zero: torch.Tensor | None = None, gx_out: tuple | None = None,
             rs_in: tuple | None = None, offset: int = 8, bits: int = 4,
             group: int = 128) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W^T (x's dtype) for a weight of `bits`-bit codes in the interleaved layout, one scale
    per `group` codes (what `ops.int_linear_impl` takes for q4, q3, q2 and tq2_0; it checks the arguments, `takes` and
    `aligned` first). gated: silu(x W1^T) * (x W3^T) from `cat_rows(w1, w3)`; residual [1, N]: added;
    norm_weight: x first through fish-speech's RMSNorm (eps norm_eps), folded in; ss_out, zero, gx_out, rs_in: the
    norm chain of `ops.norm_chain_args`. x is scaled to the integer range `exact_xmax`. Goes through
    `launch.launch`: a dry run notes it (and compiling ahead compiles its variant) instead of running it."""
    n = scales.shape[0] // (2 if gated else 1)
    words = qweight.shape[1]
    n_pad = qweight.shape[0] // (2 if gated else 1)
    warps = words // (16 * bits)
    v = Variant(warps, bits, group, gated, residual is not None, norm_weight is not None, ss_out is not None,
                zero is not None, gx_out is not None, rs_in is not None, x.dtype == torch.float16, offset,
                min_blocks(gated, warps), pdl_capable(x.device), scales.dtype == torch.float16)
    if not recording_active():
        GEMV.check(v, x.device)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    biases = (32 if group == 32 else 64) if bits == 4 else 32 * (256 // group)
    shared = warps * (64 * 16 + biases * 4) + warps * (2 if gated else 1) * 16 * 4  # < 48 KB up to `max_blocks`
    eps = rs_in[1] if rs_in is not None else norm_eps
    unused = y
    launch(GEMV, (-(-n // 16), 1, 1), v, 32 * warps, shared, qweight, scales, x, y,
           unused if residual is None else residual, unused if norm_weight is None else norm_weight,
           unused if ss_out is None else ss_out, unused if zero is None else zero,
           unused if gx_out is None else gx_out[0], unused if gx_out is None else gx_out[1],
           unused if rs_in is None else rs_in[0], n, x.shape[1], words, n_pad, scales.stride(0), float(eps),
           float(exact_xmax(bits, offset, group)), outputs=(y,))
    return y
