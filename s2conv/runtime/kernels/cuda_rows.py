"""A hand-written CUDA GEMV (one row of x) for the row-major 8-bit weights: fp8 e4m3 and q8 (int8 codes), a float32
scale per row; the float launcher (`ops.float_linear_impl`) takes it where `takes` says so, Triton everywhere
else. The same plan as `cuda_int`'s 4-bit GEMV (latency first: every load requested before any arithmetic, no
warp waits on another before the row sums; PDL inside CUDA graphs, `cuda_common`), for the row-major layout:

- one thread block per 8-row tile of the output, warp b takes the 512-code block b of K, and lane l the 16 codes
  k = 512 b + 16 l .. + 15 of each of the tile's rows: one 16-byte load a row (a warp's load is 512 contiguous
  bytes of one row), 8 loads a lane, 16 when gated, the same bytes a lane as the 4-bit kernel's 16-row tiles;
- every row a lane reads meets the same 16 x values, which it keeps in registers (no shared memory);
- fp8: two codes to a half2 per instruction (cvt.rn.f16x2.e4m3x2), fp32 products; q8: x scaled to 16-bit
  integers with the warp's block max |x| (as the 4-bit kernel) and 8 dp2a a row, the exact integer dot converted
  once per 16 codes;
- the row sums over lanes (shuffles) and warps (one barrier), then warp 0's epilogue: the row scale, silu(w1) * w3
  when gated, the residual, the norm chain (`ops.norm_chain_args`: norm_ss applies the input's RMSNorm from its
  sum of squares, with fish-speech's roundings, ss_out, zero, gx_out) as the Triton float GEMV does.

H100, whole frames (bench/RESULTS.md, twenty-seventh session): q8 243.9 -> 266.5 frames/s against the Triton
float GEMV, fp8 247.5 -> 248.0. (Before the weight loads were pinned ahead of the PDL wait, `cuda_common.pdl_wait`,
this kernel measured no faster than Triton and was set aside.) S2CONV_CUDA_ROWS=0 keeps the Triton GEMV.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from s2conv.runtime.kernels.cuda_common import STORE_ROWS, CudaGemv, available, capability, flags_source, pdl_capable
from s2conv.runtime.kernels.launch import launch, recording_active

SOURCE = r"""  // after cuda_common.PRELUDE
__device__ __forceinline__ float2 e4m3x2_to_float2(unsigned short v) {  // byte 0 -> .x, byte 1 -> .y
    unsigned h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
    float a, b;
    asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}"
        : "=f"(a), "=f"(b) : "r"(h2));
    return make_float2(a, b);
}
__device__ __forceinline__ int dp2a_lo_s(int a, int b, int c) {
    int d; asm("dp2a.lo.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ int dp2a_hi_s(int a, int b, int c) {
    int d; asm("dp2a.hi.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}

#define HALVES (GATED ? 2 : 1)
#define ROWS 8

// w: [HALVES * N, K] bytes, row-major (K % 16 == 0, rows 16-byte aligned); scales fp32 [HALVES * N]; x, res, y, g,
// gx_*: the activations' 16-bit dtype; ss_in: the input's sum of squares (NORM), g its RMSNorm weight [K].
extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) s2_rows8_gemv(
        const signed char* __restrict__ w, const float* __restrict__ scales, const u16* x, u16* y, const u16* res,
        const u16* __restrict__ g, const float* ss_in, float* ss_out, float* zero, const u16* __restrict__ gx_g,
        u16* gx_buf, int N, int K, double eps, double xmax) {
    __shared__ float sums[WARPS][HALVES * ROWS];
    const int tid = threadIdx.x, lane = tid & 31, b = tid >> 5;
    const int row0 = blockIdx.x * ROWS, k0 = b * 512 + 16 * lane;
    const bool in_k = k0 < K;
    pdl_launch_dependents();  // the next GEMV may start its own weight loads while this one runs
    // 1. the lane's 16 bytes of each row, and (lanes < ROWS) the row scales of the epilogue, all requested first
    int4 wr[HALVES][ROWS];
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const long long row = h * N + min(row0 + r, N - 1);
            wr[h][r] = in_k ? ld_stream((const int4*)(w + row * K + k0)) : make_int4(0, 0, 0, 0);
        }
    float row_scale[HALVES];
#pragma unroll
    for (int h = 0; h < HALVES; ++h) row_scale[h] = scales[h * N + min(row0 + (lane & (ROWS - 1)), N - 1)];
#if NORM
    int4 gr[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};  // the input norm's weight at the lane's 16 codes
    if (in_k) {
        gr[0] = *(const int4*)(g + k0);
        gr[1] = *(const int4*)(g + k0 + 8);
    }
#endif
    pdl_wait();  // everything above read constants only; x, res, ss_in and every write come after the producer
#if ZERO
    if (tid == 0 && blockIdx.x == 0) *zero = 0.f;  // a consumed sum-of-squares slot, free for the next step
#endif
    // 2. the lane's 16 x values (through the input's RMSNorm with NORM: round(round(x rs) g), as fish-speech)
    int4 xr[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};
    if (in_k) {
        xr[0] = ld_fresh((const int4*)(x + k0));
        xr[1] = ld_fresh((const int4*)(x + k0 + 8));
    }
    const u16* xh = (const u16*)xr;
#if NORM
    const float rs = 1.f / sqrtf(ld_fresh(ss_in) / K + (float)eps);
#endif
    float v[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        v[e] = x_to_f(xh[e]);
#if NORM
        v[e] = x_to_f(f_to_x(x_to_f(f_to_x(v[e] * rs)) * x_to_f(((const u16*)gr)[e])));
#endif
    }
    // 3. the dot products of the lane's 16 codes with its x, one per row
    float acc[HALVES][ROWS];
#if FP8
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const unsigned* wv = (const unsigned*)&wr[h][r];
            float a = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 c01 = e4m3x2_to_float2((unsigned short)(wv[q] & 0xffffu));
                const float2 c23 = e4m3x2_to_float2((unsigned short)(wv[q] >> 16));
                a = fmaf(c01.x, v[4 * q], a);
                a = fmaf(c01.y, v[4 * q + 1], a);
                a = fmaf(c23.x, v[4 * q + 2], a);
                a = fmaf(c23.y, v[4 * q + 3], a);
            }
            acc[h][r] = a;
        }
#else
    // x as 16-bit integers with the block's own scale (its max |x| over the warp's 512 codes, by shuffles)
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) amax = fmaxf(amax, fabsf(v[e]));
#pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float inv = amax > 0.f ? (float)xmax / amax : 0.f, rinv = amax > 0.f ? amax / (float)xmax : 0.f;
    int xp[8];  // x integer pairs (2 j, 2 j + 1): low and high 16 bits
#pragma unroll
    for (int j = 0; j < 8; ++j)
        xp[j] = (__float2int_rn(v[2 * j] * inv) & 0xffff) | ((unsigned)__float2int_rn(v[2 * j + 1] * inv) << 16);
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int* wv = (const int*)&wr[h][r];
            int c = 0;  // |c| <= 16 * 32767 * 127: exact in int32
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                c = dp2a_lo_s(xp[2 * q], wv[q], c);
                c = dp2a_hi_s(xp[2 * q + 1], wv[q], c);
            }
            acc[h][r] = (float)c * rinv;
        }
#endif
    // 4. sums over the warp's lanes, then (after the barrier) over the warps, by warp 0
#pragma unroll
    for (int o = 16; o; o >>= 1)
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[h][r] += __shfl_xor_sync(0xffffffffu, acc[h][r], o);
    if (lane == 0)
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sums[b][h * ROWS + r] = acc[h][r];
    __syncthreads();
    if (tid >= 32) return;
    // the epilogue, lane r of warp 0 for row row0 + r: scale, gate, rounding, + residual (rounded again, as eager
    // h + linear(x)); GX: the output times the next norm's weight too; SS: its sum of squares
    const bool live = lane < ROWS && row0 + lane < N;
    float o = 0.f;
    if (live) {
        float t[HALVES];
#pragma unroll
        for (int h = 0; h < HALVES; ++h) {
            float s = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) s += sums[wi][h * ROWS + lane];
            t[h] = s * row_scale[h];
        }
""" + STORE_ROWS


@dataclass(frozen=True)
class Variant:
    """One compiled specialization: warps (= 512-code blocks of K), fp8 codes (else int8), gated, residual, the
    norm chain's flags (norm_ss, ss_out, zero, gx_out), fp16 x (else bf16), thread blocks per SM the registers must
    allow (__launch_bounds__), the PDL helpers on (sm_90+)."""

    warps: int
    fp8: bool
    gated: bool = False
    has_res: bool = False
    norm: bool = False
    ss: bool = False
    zero: bool = False
    gx: bool = False
    fp16: bool = False
    min_blocks: int = 1
    pdl: bool = False

    def source(self) -> str:
        return flags_source(dict(WARPS=self.warps, FP8=self.fp8, GATED=self.gated, HAS_RES=self.has_res,
                                 NORM=self.norm, SS=self.ss, ZERO=self.zero, GX=self.gx, XF16=self.fp16,
                                 MINB=self.min_blocks, PDL=self.pdl), SOURCE)


def max_blocks(gated: bool) -> int:
    """The most 512-code blocks of K (one warp each) a thread block keeps in registers without spilling (sm_90):
    24 (768 threads), gated 16 (`tests/test_cuda_rows.py` compiles both limits)."""
    return 16 if gated else 24


def min_blocks(gated: bool, warps: int) -> int:
    """__launch_bounds__'s blocks per SM: 3 for gated tiles of up to 5 warps (registers for 2 x 8 loads a lane,
    as the 4-bit kernel), else what the registers allow."""
    return 3 if gated and warps <= 5 else 1


def takes(x: torch.Tensor, weight: torch.Tensor, has_scale: bool, group: int, k: int, gated: bool) -> bool:
    """Whether `rows8_gemv` takes this linear (`ops.float_linear_impl` asks): `available(x)`, fp8 e4m3 (on sm_90+)
    or int8 codes with a scale per row (no groups), K a multiple of 16 within `max_blocks`, unless
    S2CONV_CUDA_ROWS=0. Only where the launch can use PDL (`pdl_capable`): without it (below sm_90,
    S2CONV_CUDA_PDL=0) this kernel measured no faster than Triton."""
    if not (available(x) and has_scale and group == 0 and k % 16 == 0 and 0 < k <= max_blocks(gated) * 512
            and os.environ.get("S2CONV_CUDA_ROWS", "1") != "0" and pdl_capable(x.device)):
        return False
    return weight.dtype == torch.int8 or (weight.dtype == torch.float8_e4m3fn and capability(x.device) >= 9)


def aligned(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, norm_ss: tuple | None = None) -> bool:
    """The memory layout the kernel's 16-byte loads assume: contiguous 16-byte aligned x, weight and input norm
    weight (norm_ss[1], in x's dtype: read as 16-bit values), contiguous scales."""
    g = None if norm_ss is None else norm_ss[1]
    return (x.is_contiguous() and weight.is_contiguous() and scales.is_contiguous() and x.data_ptr() % 16 == 0
            and weight.data_ptr() % 16 == 0
            and (g is None or (g.is_contiguous() and g.data_ptr() % 16 == 0 and g.dtype == x.dtype)))


GEMV = CudaGemv("s2_rows8_gemv")


def rows8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, gated: bool = False,
               residual: torch.Tensor | None = None, ss_out: torch.Tensor | None = None,
               zero: torch.Tensor | None = None, norm_ss: tuple | None = None, gx_out: tuple | None = None,
               xmax: int = 32767) -> torch.Tensor:
    """y [1, N] = (x [1, K] @ weight^T) * scales (x's dtype) for weight fp8 e4m3 or int8 [R, K], scales fp32 [R]
    (R = N, or 2N gated: silu(x W1^T) * (x W3^T) from w1 over w3); residual [1, N]: added; ss_out, zero, norm_ss,
    gx_out: the norm chain of `ops.norm_chain_args`. xmax: the integer range of x for int8 codes. The caller
    (`ops.float_linear_impl`) checks the arguments, `takes` and `aligned` first. Goes through `launch.launch`."""
    rows, k = weight.shape
    n = rows // 2 if gated else rows
    warps = -(-k // 512)
    v = Variant(warps, weight.dtype == torch.float8_e4m3fn, gated, residual is not None, norm_ss is not None,
                ss_out is not None, zero is not None, gx_out is not None, x.dtype == torch.float16,
                min_blocks(gated, warps), pdl_capable(x.device))
    if not recording_active():
        GEMV.check(v, x.device)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    eps = norm_ss[2] if norm_ss is not None else 0.0
    unused = y
    launch(GEMV, (-(-n // 8), 1, 1), v, 32 * warps, 0, weight, scales, x, y,
           unused if residual is None else residual, unused if norm_ss is None else norm_ss[1],
           unused if norm_ss is None else norm_ss[0], unused if ss_out is None else ss_out,
           unused if zero is None else zero, unused if gx_out is None else gx_out[0],
           unused if gx_out is None else gx_out[1], n, k, float(eps), float(xmax), outputs=(y,))
    return y
