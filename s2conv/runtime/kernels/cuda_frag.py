"""A hand-written CUDA GEMV (one row of x) for the K-quants with mins, read straight from the fragment layout of
`layout.py` with their two-level scales (q4_k: 4-bit codes in 32-code groups; q3_k: its 3-bit codes + 4 in
16-code groups, signed scale bytes; q2_k: 2-bit codes in 16-code groups), so that batched rows keep the tensor-core
kernel of `triton_mma` on the same weight. Compiled at load time by NVRTC, as `cuda_int`'s kernel, whose epilogue
(gate, residual, norm chain) it shares.

A thread block takes one 16-row tile; warp w takes its 512 codes (8 chunks of 4-bit codes, 4 of 2- or 3-bit
ones), requests all their words (one 16-byte load a chunk and lane, and for 3-bit codes an 8-byte load of their
high bits) and the warp's scales (the sub-block bytes and (d,
dmin) of one super-block a lane) before it waits for its producer (PDL), then:
1. x of its 512 codes as 16-bit integers round(x * inv), inv = XMAX / max |x| over them, in shared memory in k
   order;
2. lane l = 4 g + q holds rows g and g + 8 of the tile, and of every group the consecutive codes the layout gives
   it (32-code groups: 8 q .. 8 q + 7; 16-code groups: 4 q .. 4 q + 3): a word's codes are masked into bytes by
   steps, and a byte permute pairs each step's codes k, k + 1, so that one dp2a takes a pair of one group. Each group's
   integer dot over the lane's codes is exact; a super-block's dots times their 6- or 4-bit scales sc, and its
   sums of x integers times their mins m, add up in integers (below 2**31), and only then meet (d, dmin) in
   floats (the sums over q complete both);
3. the sub-block bytes (sc | m << 8) and (d, dmin) of row R's super-block s sit in lane 2 R + s after the loads;
   each lane puts them in shared memory, where the lanes that need them read them (q2_k, q3_k: one 16-byte read
   for a row's 8 groups of a chunk, where shuffles took one instruction a 4-byte word; q4_k: one 4-byte read, as
   many as the shuffles were) and decode them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from s2conv.runtime.kernels.cuda_common import CudaGemv, available, flags_source, pdl_capable
from s2conv.runtime.kernels.cuda_int import EPILOGUE, max_blocks, max_k, min_blocks
from s2conv.runtime.kernels.launch import launch, recording_active
from s2conv.runtime.kernels.layout import fragment_chunk_words

SOURCE = r"""  // after cuda_common.PRELUDE
__device__ __forceinline__ int comp(int4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
// byte i of v: q4_k's and q2_k's scale and min bytes are unsigned (up to 63), q3_k's signed
// (one byte permute each: selector nibble 4 picks the zero operand's byte, 8 | i replicates byte i's sign bit)
__device__ __forceinline__ int permute(unsigned v, unsigned sel) {
    int r; asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(v), "r"(sel)); return r;
}
__device__ __forceinline__ int ubyte(unsigned v, int i) { return permute(v, 0x4440u | i); }
__device__ __forceinline__ int sbyte(unsigned v, int i) { return permute(v, i + (8 | i) * 0x1110u); }
__device__ __forceinline__ unsigned pair_steps(unsigned m) {  // bytes [a, b, c, d] -> [a, c, b, d]
    unsigned r; asm("prmt.b32 %0, %1, 0, 0x3120;" : "=r"(r) : "r"(m)); return r;
}

// qw: int32 [HALVES * tiles, chunks * 128] in the fragment layout (a tile's chunk of 256 / BITS codes: 32 lanes x
// one int4, word 2 kk + h of lane 4 g + q: row 16 tile + 8 h + g; bits [BITS s, + BITS) and [16 + BITS s, + BITS):
// the codes at k and k + 1 of step s: 4-bit: k = 64 chunk + 32 j + 8 q + 4 s' + 2 kk, s = 2 j + s' (32-code
// groups j); 2-bit: k = 128 chunk + 16 s + 4 q + 2 kk (16-code groups s)); sub: int16 [HALVES * N, stride_s]
// (sc | m << 8 per group); dm: fp32 [HALVES * N, stride_m / 2, 2] (d, dmin per 256 codes: KQ groups). Shared
// memory: per warp its 512 x integers (k order), then the row sums [WARPS][HALVES * 16], then each warp's sums of
// x integers per scale group [WARPS][32] (q4_k, q2_k; q3_k leaves them unused), then the scales as the lanes loaded
// them: sub-block bytes int4 [WARPS][HALVES][32][SBV] and (d, dmin) float2 [WARPS][HALVES][32].
#define HALVES (GATED ? 2 : 1)
#define CH (BITS == 3 ? 128 : 256 / BITS)  // codes a chunk (layout.fragment_chunk)
#define CPW (512 / CH)       // chunks a warp takes (512 codes)
#define CWV (CH * BITS / 8)  // int4 vectors a tile's chunk: one a lane (3-bit: then the high bits, half one a lane)
#define KQ (256 / GROUP)      // groups a super-block
#define SBV (KQ / 8)         // int4 vectors of sub-block bytes a super-block
extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) s2_frag_gemv(
        const int4* __restrict__ qw, const int4* __restrict__ sub, const float2* __restrict__ dm,
        const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ res, float* ss_out, float* zero,
        const u16* __restrict__ gx_g, u16* __restrict__ gx_buf, const float* rs_in,
        int N, int K, int chunks, int tiles, int stride_s, int stride_m, double eps, double xmax) {
    extern __shared__ int4 smem[];
    const int tid = threadIdx.x, lane = tid & 31, b = tid >> 5, g = lane >> 2, q = lane & 3;
    const int row0 = blockIdx.x * 16;
    short* xs = (short*)(smem + b * 64);
    float* sums = (float*)(smem + WARPS * 64);
    int* xgroups = (int*)(sums + WARPS * HALVES * 16);
#if BITS != 3
    int* xgroup = xgroups + 32 * b;  // its groups' sums of x integers (q4_k 16, q2_k 32)
#endif
    // the warp's scales as the lanes loaded them (lane 2 R + s: row R's super-block s), for every lane to read
    int4* sub_s = (int4*)(xgroups + WARPS * 32) + b * HALVES * 32 * SBV;
    float2* dm_s = (float2*)((int4*)(xgroups + WARPS * 32) + WARPS * HALVES * 32 * SBV) + b * HALVES * 32;
    // 1. this warp's words and scales, all requested first
    pdl_launch_dependents();
    int4 wr[HALVES][CPW];
#if BITS == 3
    int2 hb[HALVES][CPW];  // the high bits: word kk of the lane's 8 bytes for words 2 kk + h of wr
#endif
    int4 scb[HALVES][SBV];  // sub-block bytes of row row0 + lane / 2, super-block lane % 2 of this warp's 512 codes
    float2 sdm[HALVES];  // its (d, dmin)
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
        const int4* base = qw + ((long long)(h * tiles + blockIdx.x) * chunks + CPW * b) * CWV;
#pragma unroll
        for (int u = 0; u < CPW; ++u) wr[h][u] = ld_stream(base + CWV * u + lane);
#if BITS == 3
#pragma unroll
        for (int u = 0; u < CPW; ++u) hb[h][u] = ld_stream((const int2*)(base + CWV * u + 32) + lane);
#endif
        const long long row = h * N + min(row0 + lane / 2, N - 1);
#pragma unroll
        for (int v = 0; v < SBV; ++v) scb[h][v] = sub[(row * stride_s + 2 * KQ * b) / 8 + SBV * (lane & 1) + v];
        sdm[h] = dm[(row * stride_m) / 2 + 2 * b + (lane & 1)];
    }
    pdl_wait();
#if ZERO
    if (tid == 0 && blockIdx.x == 0) *zero = 0.f;
#endif
    // 2. x: lane l scales codes 16 l .. 16 l + 15 of the warp's 512 (K is a whole number of them: `aligned`)
    const int k0 = b * 512 + 16 * lane;
    int4 xr[2];
    xr[0] = ld_fresh((const int4*)(x + k0));
    xr[1] = ld_fresh((const int4*)(x + k0 + 8));
    const u16* xh = (const u16*)xr;
    float v[16], amax = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        v[e] = x_to_f(xh[e]);
        amax = fmaxf(amax, fabsf(v[e]));
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float inv = amax > 0.f ? (float)xmax / amax : 0.f, rinv = amax > 0.f ? amax / (float)xmax : 0.f;
    {
        int w[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
            w[e] = (__float2int_rn(v[2 * e] * inv) & 0xffff) | (__float2int_rn(v[2 * e + 1] * inv) << 16);
        ((int4*)xs)[2 * lane] = make_int4(w[0], w[1], w[2], w[3]);
        ((int4*)xs)[2 * lane + 1] = make_int4(w[4], w[5], w[6], w[7]);
#if BITS != 3
        int gs = 0;  // the sum of x integers of 16-code group `lane` of the warp's 512 codes
#pragma unroll
        for (int e = 0; e < 8; ++e) gs = dp2a_lo(w[e], 0x0101u, gs);
#if BITS == 4
        gs += __shfl_xor_sync(0xffffffffu, gs, 1);  // q4_k: of 32-code group lane / 2
        if (!(lane & 1)) xgroup[lane / 2] = gs;
#else
        xgroup[lane] = gs;
#endif
#endif
    }
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll
        for (int v = 0; v < SBV; ++v) sub_s[(h * 32 + lane) * SBV + v] = scb[h][v];
        dm_s[h * 32 + lane] = sdm[h];
    }
    __syncwarp();
    float acc[HALVES][2] = {};
    int isc[HALVES][2] = {};  // a super-block's sums of sc * dot, in integers
#if BITS != 3
    int imn[HALVES][2] = {};  // ... and of m * sum(x) (q3_k: its dots hold them)
#endif
#if BITS == 4 && GROUP == 32
    // 3. per chunk u: groups 2 u + j (j = 0, 1), each the lane's 8 codes at 64 u + 32 j + 8 q .. + 7; a lane's
    // dot of a group is below 8 * 15 * 32767, times sc (6 bits) over the 8 groups of a super-block below 2**31
    // mins per whole group: lanes q = 0, 1 take group 2 u + q (its sum of x from step 2), the sums over the four
    // lanes q complete the two
    const unsigned msel = 0x4440u | (2 * (q & 1) + 1);  // the min byte of group 2 u + q in its word
#pragma unroll
    for (int u = 0; u < 8; ++u) {
        const int4 x0 = ((const int4*)xs)[8 * u + q], x1 = ((const int4*)xs)[8 * u + 4 + q];
        const int xg = q < 2 ? xgroup[2 * u + q] : 0;
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {  // row g + 8 hr
                const int src = 2 * (g + 8 * hr) + u / 4;  // the lane holding this row's super-block u / 4
                const unsigned sm = ((const unsigned*)(sub_s + (h * 32 + src) * SBV))[u % 4];
                int c0 = 0, c1 = 0;
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    const unsigned w = (unsigned)comp(wr[h][u], 2 * kk + hr);
                    const unsigned even = pair_steps(w & 0x0F0F0F0Fu), odd = pair_steps((w >> 4) & 0x0F0F0F0Fu);
                    c0 = dp2a_lo(comp(x0, kk), even, c0);       // step 0: group 2 u, codes 8 q + 2 kk, + 1
                    c0 = dp2a_lo(comp(x0, 2 + kk), odd, c0);    // step 1: + 4
                    c1 = dp2a_hi(comp(x1, kk), even, c1);       // step 2: group 2 u + 1
                    c1 = dp2a_hi(comp(x1, 2 + kk), odd, c1);    // step 3
                }
                isc[h][hr] += c0 * ubyte(sm, 0) + c1 * ubyte(sm, 2);
                imn[h][hr] += xg * permute(sm, msel);
                if (u % 4 == 3) {  // the super-block's end: its (d, dmin)
                    const float2 dd = dm_s[h * 32 + src];
                    acc[h][hr] += dd.x * (float)isc[h][hr] - dd.y * (float)imn[h][hr];
                    isc[h][hr] = imn[h][hr] = 0;
                }
            }
    }
#elif BITS == 4
#error "4-bit codes take 32-code groups here (q4_k)"
#else
    // 3. 16-code groups (q3_k: 3-bit codes, q2_k: 2-bit ones): per chunk u (CH = 128 codes), groups
    // SPC (u % CPS) + s of super-block u / CPS (s < SPC = CH / 16; CPS = 2 chunks a super-block), each the
    // lane's 4 codes at CH u + 16 s + 4 q .. + 3; (w >> 2 t) & MASK, paired, holds steps t and SPC / 2 + t (3-bit:
    // with the high bits ORed in above them, (hw >> 4 h + t) & 0x01010101 shifted by 2: layout.py): one dp2a.lo
    // and one dp2a.hi. A lane's dot of a group is below 4 * 7 * 32767, times |sc| <= 32 (q3_k, signed) or sc < 16
    // (q2_k) over 16 groups below 2**29.
#define SPC (CH / 16)
#define CPS (256 / CH)
#define MASK 0x03030303u
#define SCALE_BYTE(v, i) (BITS == 3 ? sbyte(v, i) : ubyte(v, i))
#if BITS == 2
    const unsigned msel = 0x4440u | (2 * (q & 1) + 1);  // the min byte of groups q, q + 4 in their words
#endif
#pragma unroll
    for (int u = 0; u < CPW; ++u) {
        int xp[SPC][2];  // [s][kk]: the pair at CH u + 16 s + 4 q + 2 kk
#if BITS == 3
        int xsum[SPC];  // -4 times the sum of the lane's 4 x integers of group s
#endif
#pragma unroll
        for (int st = 0; st < SPC; ++st) {
            const int2 p = ((const int2*)xs)[(CH / 4) * u + 4 * st + q];
            xp[st][0] = p.x;
            xp[st][1] = p.y;
#if BITS == 3
            // its min is 4 sc with dmin = d (`layout.repack_int` checks): the dots start from -4 sum(x)
            xsum[st] = -4 * dp2a_lo(p.y, 0x0101u, dp2a_lo(p.x, 0x0101u, 0));
#endif
        }
#if BITS == 2
        // q2_k's mins: lane q takes groups q and q + 4 of the chunk whole (their sums of x from step 2; the sums
        // over the 4 lanes q complete the other groups), rather than every group's 4 codes it holds
        const int xg0 = xgroup[SPC * u + q], xg1 = xgroup[SPC * u + q + 4];
#endif
#pragma unroll
        for (int h = 0; h < HALVES; ++h)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int src = 2 * (g + 8 * hr) + u / CPS;  // the lane holding this row's super-block u / CPS
                // groups SPC (u % CPS) + 2 i, + 1: (sc, m, sc, m) bytes (vector u % CPS of the super-block's two)
                const int4 sv = sub_s[(h * 32 + src) * SBV + u % CPS];
                const unsigned sm[SPC / 2] = {(unsigned)sv.x, (unsigned)sv.y, (unsigned)sv.z, (unsigned)sv.w};
                int c[SPC];
#pragma unroll
                for (int st = 0; st < SPC; ++st) {
#if BITS == 3
                    c[st] = xsum[st];
#else
                    c[st] = 0;
#endif
                }
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    const unsigned w = (unsigned)comp(wr[h][u], 2 * kk + hr);
#if BITS == 3
                    const unsigned hw = (unsigned)(kk == 0 ? hb[h][u].x : hb[h][u].y);
#endif
#pragma unroll
                    for (int t = 0; t < SPC / 2; ++t) {
#if BITS == 3
                        const unsigned hi = ((hw >> (4 * hr + t)) & 0x01010101u) << 2;
                        const unsigned m = pair_steps(((w >> (2 * t)) & MASK) | hi);
#else
                        const unsigned m = pair_steps((w >> (2 * t)) & MASK);
#endif
                        c[t] = dp2a_lo(xp[t][kk], m, c[t]);
                        c[SPC / 2 + t] = dp2a_hi(xp[SPC / 2 + t][kk], m, c[SPC / 2 + t]);
                    }
                }
#pragma unroll
                for (int st = 0; st < SPC; ++st) isc[h][hr] += c[st] * SCALE_BYTE(sm[st / 2], 2 * (st % 2));
#if BITS == 2
                imn[h][hr] += xg0 * permute(q & 2 ? sm[1] : sm[0], msel) + xg1 * permute(q & 2 ? sm[3] : sm[2], msel);
#endif
                if (u % CPS == CPS - 1) {  // the super-block's end: its (d, dmin)
                    const float2 dd = dm_s[h * 32 + src];
#if BITS == 3
                    acc[h][hr] += dd.x * (float)isc[h][hr];
                    isc[h][hr] = 0;
#else
                    acc[h][hr] += dd.x * (float)isc[h][hr] - dd.y * (float)imn[h][hr];
                    isc[h][hr] = imn[h][hr] = 0;
#endif
                }
            }
    }
#endif
    // 4. sums over the 4 lanes q of a row pair, then over the warps (the shared epilogue, warp 0)
#pragma unroll
    for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float a = acc[h][hr] * rinv;
            a += __shfl_xor_sync(0xffffffffu, a, 1);
            a += __shfl_xor_sync(0xffffffffu, a, 2);
            if (q == 0) sums[b * HALVES * 16 + h * 16 + g + 8 * hr] = a;
        }
    __syncthreads();
""" + EPILOGUE


@dataclass(frozen=True)
class Variant:
    """One compiled specialization: warps (= 512-code pieces of K), code bits and group (4 and 32: q4_k; 3 and 16:
    q3_k; 2 and 16: q2_k), gated, residual, norm chain flags (`ops.norm_chain_args`), fp16 x (else bf16), thread
    blocks per SM for __launch_bounds__, the PDL prologue."""

    warps: int
    bits: int = 4
    group: int = 32
    gated: bool = False
    has_res: bool = False
    ss: bool = False
    zero: bool = False
    gx: bool = False
    rs: bool = False
    fp16: bool = False
    min_blocks: int = 1
    pdl: bool = False

    def source(self) -> str:
        flags = dict(WARPS=self.warps, BITS=self.bits, GROUP=self.group, GATED=self.gated, HAS_RES=self.has_res,
                     NORM=False, SS=self.ss, ZERO=self.zero, GX=self.gx, RS=self.rs, XF16=self.fp16,
                     MINB=self.min_blocks, PDL=self.pdl)
        return flags_source(flags, SOURCE)


def takes(x: torch.Tensor, bits: int, group: int, kq: int, k: int, gated: bool) -> bool:
    """Whether `frag_gemv` takes this one-row linear (`ops.fragment_linear_impl` asks): `available(x)`, 4-bit codes
    in 32-code groups with two-level scales of 8 groups a super-block (q4_k), or 3- or 2-bit codes in 16-code groups,
    16 a super-block (q3_k, q2_k), K a whole number of 512-code pieces up to what the registers hold,
    `cuda_int.max_k` and the 48 KB of shared memory a launch gets without asking (q2_k, q3_k: K <= 9728, all of
    S2's; gated 6144); S2CONV_CUDA_FRAG=0 (or S2CONV_INT_DOT=0, as for the other integer GEMVs) keeps the
    tensor-core kernel."""
    return (available(x) and os.environ.get("S2CONV_CUDA_FRAG", "1") != "0"
            and os.environ.get("S2CONV_INT_DOT", "1") != "0"
            and (bits, group, kq) in ((4, 32, 8), (3, 16, 16), (2, 16, 16))
            and k % 512 == 0 and 0 < k <= min(max_k(x.device), max_blocks(gated) * 512)
            and shared_bytes(k // 512, bits, gated) <= SHARED_MAX)


SHARED_MAX = 48 * 1024  # a launch's shared memory without cudaFuncSetAttribute


def shared_bytes(warps: int, bits: int, gated: bool) -> int:
    """Shared memory of a launch: per warp its x integers (1 KB), group sums of x (128 bytes), and per weight half
    its row sums (64 bytes) and its lanes' scales (the sub-block bytes and (d, dmin) of 32 (row, super-block)
    pairs)."""
    sbv = 1 if bits == 4 else 2  # int4 vectors of sub-block bytes a super-block
    return warps * (1024 + 128 + (2 if gated else 1) * (16 * 4 + 32 * (16 * sbv + 8)))


def aligned(x: torch.Tensor, qweight: torch.Tensor, sub: torch.Tensor, dm: torch.Tensor) -> bool:
    """The layout the loads assume: contiguous x, qweight and (d, dmin); sub-block rows of whole 16-byte vectors;
    every base 16-byte aligned."""
    return (x.is_contiguous() and qweight.is_contiguous() and dm.is_contiguous() and sub.stride(1) == 1
            and sub.stride(0) % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (x, qweight, sub, dm)))


GEMV = CudaGemv("s2_frag_gemv")


def frag_gemv(x: torch.Tensor, qweight: torch.Tensor, sub: torch.Tensor, dm: torch.Tensor, gated: bool = False,
              residual: torch.Tensor | None = None, ss_out: torch.Tensor | None = None,
              zero: torch.Tensor | None = None, gx_out: tuple | None = None, rs_in: tuple | None = None,
              xmax: int = 32767, bits: int = 4, group: int = 32) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W^T for a q4_k (bits 4), q3_k (3) or q2_k (2) weight in the fragment layout with its
    two-level scales (sub-block bytes int16 [R, groups], (d, dmin) fp32 [R, super-blocks, 2]); gated, residual
    and the norm chain as in `cuda_int.int_gemv` (`ops.fragment_linear_impl` checks the arguments, `takes` and
    `aligned` first). xmax: x's integer range, at most 32767 (a super-block's integer sums then stay below 2**31)."""
    n = sub.shape[0] // (2 if gated else 1)
    tiles = qweight.shape[0] // (2 if gated else 1)
    chunks = qweight.shape[1] // fragment_chunk_words(bits)
    warps = x.shape[1] // 512
    v = Variant(warps, bits, group, gated, residual is not None, ss_out is not None, zero is not None,
                gx_out is not None, rs_in is not None, x.dtype == torch.float16, min_blocks(gated, warps),
                pdl_capable(x.device))
    if not recording_active():
        GEMV.check(v, x.device)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    shared = shared_bytes(warps, bits, gated)
    unused = y
    launch(GEMV, (tiles, 1, 1), v, 32 * warps, shared, qweight, sub, dm, x, y,
           unused if residual is None else residual, unused if ss_out is None else ss_out,
           unused if zero is None else zero, unused if gx_out is None else gx_out[0],
           unused if gx_out is None else gx_out[1], unused if rs_in is None else rs_in[0], n, x.shape[1], chunks,
           tiles, sub.stride(0), dm.shape[1] * 2, float(rs_in[1] if rs_in is not None else 0.0), float(xmax),
           outputs=(y,))
    return y
