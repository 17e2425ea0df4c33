"""Probe: q4 (4-bit codes, a scale per 128) read row-major by a float-style GEMV, against the landed dp2a GEMV.

The codes sit two per byte along K (code 2j in the low nibble of byte j, 2j + 1 in the high one, unsigned u =
code + 8) and the scales are fp16 [N, K / 128]. Per four bytes, inline PTX turns the eight codes into fp16 values
(u - 8) * s: two byte permutes, four LOP3s that put each nibble under the exponent of 1024 (fp16 1024 + u or
1024 + 16 u), two half2 subtractions / fused multiply-adds that leave u - 8 exactly, and four half2 multiplies by
the scale. The products with x and the sums are fp32, as in the fp8 GEMV, whose loop structure (a [rows, K step]
tile per step, optionally through an asynchronous-copy pipeline) this copies. S2's layer shapes, M = 1,
graph-timed with rotating weights; each variant checked against the dequantized reference first.

    python scripts/probe_rowmajor4.py            (a CUDA GPU; TRITON_INTERPRET=1 on CPU: --small)
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from probe_variants import copies, device, per_layer, run_cases
from s2conv.runtime.kernels import INT_SPECS, REPACK, ops

GROUP = tl.constexpr(128)


@triton.jit
def _nibbles(w, s, ASM: tl.constexpr):
    """Bytes w [.., B] (two codes each, u = code + 8) and their scales s (fp16, same shape) -> the fp16 values
    (u - 8) * s of the low and of the high nibbles, each [.., B]."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 a, b, c, d; "
            "prmt.b32 a, $4, 0, 0x4140; prmt.b32 b, $4, 0, 0x4342; "
            "lop3.b32 $0, a, 0x000f000f, 0x64006400, 0xea; lop3.b32 $1, b, 0x000f000f, 0x64006400, 0xea; "
            "lop3.b32 $2, a, 0x00f000f0, 0x64006400, 0xea; lop3.b32 $3, b, 0x00f000f0, 0x64006400, 0xea; "
            "mov.b32 c, 0x64086408; sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; "
            "mov.b32 c, 0x2c002c00; mov.b32 d, 0xd480d480; fma.rn.f16x2 $2, $2, c, d; fma.rn.f16x2 $3, $3, c, d; "
            "mul.f16x2 $0, $0, $5; mul.f16x2 $1, $1, $6; mul.f16x2 $2, $2, $5; mul.f16x2 $3, $3, $6; }",
            "=r,=r,=r,=r,r,r,r", [w, s], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        return lo, hi
    u = w.to(tl.int32)
    sf = s.to(tl.float32)
    return (((u & 15) - 8).to(tl.float32) * sf).to(tl.float16), (((u >> 4) - 8).to(tl.float32) * sf).to(tl.float16)


@triton.jit
def rm4_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PIPE: tl.constexpr, ASM: tl.constexpr):
    """y[n] = sum_k x[k] (u[n, k] - 8) s[n, k // 128]; one BLOCK_N-row tile per program, K a multiple of BLOCK_K,
    N of BLOCK_N (the probe's shapes)."""
    NG: tl.constexpr = BLOCK_K // GROUP
    G2: tl.constexpr = GROUP // 2
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.arange(0, NG)
    j = tl.arange(0, G2)
    byte = g[:, None] * G2 + j[None, :]  # [NG, G2]: byte of the tile row
    w_rows = w_ptr + rows[:, None, None].to(tl.int64) * stride_wn + byte[None, :, :]
    s_rows = s_ptr + rows[:, None, None].to(tl.int64) * stride_sn + g[None, :, None]
    acc_lo = tl.zeros([BLOCK_N, NG, G2], tl.float32)
    acc_hi = tl.zeros([BLOCK_N, NG, G2], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=PIPE):
        w = tl.load(w_rows + k0 // 2)
        s = tl.broadcast_to(tl.load(s_rows + k0 // GROUP), [BLOCK_N, NG, G2])
        xe = tl.load(x_ptr + k0 + 2 * byte).to(tl.float32)[None, :, :]
        xo = tl.load(x_ptr + k0 + 2 * byte + 1).to(tl.float32)[None, :, :]
        lo, hi = _nibbles(w, s, ASM)
        acc_lo += lo.to(tl.float32) * xe
        acc_hi += hi.to(tl.float32) * xo
    y = tl.sum(tl.sum(acc_lo + acc_hi, axis=2), axis=1)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty))


def rm4_linear(x, w, s, block_n, block_k, pipe, warps):
    n = w.shape[0]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    rm4_gemv_kernel[(n // block_n,)](x, w, s, y, n, x.shape[1], w.stride(0), s.stride(0), BLOCK_N=block_n,
                                     BLOCK_K=block_k, PIPE=pipe, ASM=x.device.type == "cuda", num_warps=warps)
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small shapes (the interpreter's correctness check)")
    ap.add_argument("--configs", default="8x256p1,8x256p3,8x512p1,8x512p3,16x256p1,16x256p3,16x512p3",
                    help="rows x K step, p pipeline stages (w: warps, default 4), comma-separated")
    args = ap.parse_args()
    dev, shapes = device(args.small)
    if args.small:
        shapes = {"a": (32, 1024, 1), "b": (16, 512, 1)}
    spec = INT_SPECS["q4"]
    g = torch.Generator(device=dev).manual_seed(0)
    totals: dict[str, float] = {}
    failed = False
    for name, (n, k, _) in shapes.items():
        codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), generator=g, dtype=torch.int16, device=dev)
        scales = (torch.rand((n, k // int(GROUP)), generator=g, device=dev) * 0.01 + 0.001).half().float()
        landed = REPACK["q4"](codes, scales)
        u = (codes + 8).to(torch.uint8).view(n, k // 2, 2)
        rm = {"w": (u[..., 0] | (u[..., 1] << 4)).contiguous(), "s": scales.half().contiguous()}
        x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
        ref = x.float() @ (codes.float() * scales.repeat_interleave(int(GROUP), dim=1)).T
        packs = copies(rm["w"].numel() * 1.14, lambda: ({kk: t.clone() for kk, t in landed.items()},
                                                        {kk: t.clone() for kk, t in rm.items()}))
        cases = {"landed": lambda p: ops.int_linear_impl(x, p[0]["qweight"], p[0]["scales"], None, spec.bits,
                                                         spec.offset, spec.group, False)}
        for c in args.configs.split(","):
            bn, rest = c.split("x")
            bk, rest = rest.split("p")
            pipe, _, warps = rest.partition("w")
            if n % int(bn) == 0 and k % int(bk) == 0:
                cases[c] = lambda p, bn=int(bn), bk=int(bk), pipe=int(pipe), w=int(warps or 4): rm4_linear(
                    x, p[1]["w"], p[1]["s"], bn, bk, pipe, w)
        line, ok = run_cases(cases, (landed, rm), packs, ref, dev, totals)
        failed |= not ok
        print(f"q4 {name:6s} | {line}", flush=True)
    per_layer("q4", totals)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
