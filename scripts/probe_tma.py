"""Probe: the dp2a integer GEMV with its weight tiles brought in by the Hopper copy engine (TMA tensor descriptors,
`tl.range(.., num_stages=S)` keeps S - 1 blocks in flight without registers) against the landed kernel, at S2's
layer shapes, M = 1, graph-timed with rotating weights; each variant checked against the dequantized reference.

    python scripts/probe_tma.py [--formats q4,q2] [--stages 2,3,4,6]     (a CUDA GPU; TRITON_INTERPRET=1 on CPU
                                                                            checks correctness at small shapes)
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from probe_variants import copies, device, per_layer, run_cases, split_outputs
from s2conv.runtime.kernels import INT_SPECS, REPACK, dequantize_packed, ops
from s2conv.runtime.kernels.common import finish_split, store_output
from s2conv.runtime.kernels.triton_int import _idp_block, _load_scales, _x_absmax

_W = tl.constexpr(16)
_R = tl.constexpr(16)
_BLOCK_K = tl.constexpr(512)


@triton.jit
def _tile(w_desc, base, s: tl.constexpr, NT: tl.constexpr, RS: tl.constexpr):
    return tl.reshape(w_desc.load([base, 0, s, 0]), [NT, _W, RS])


@triton.jit
def tma_gemv_kernel(x_ptr, w_desc, s_ptr, out_ptr, part_ptr, cnt_ptr, N, K, n_blocks, blocks_per_split, n_split,
                    stride_sn, stride_ps, BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr,
                    XMAX: tl.constexpr, SLICES: tl.constexpr, STAGES: tl.constexpr, PARTIAL: tl.constexpr,
                    ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    amax = _x_absmax(x_ptr, K, b_start * _BLOCK_K, b_end * _BLOCK_K, True)
    inv = tl.where(amax > 1e-30, XMAX / amax, 0.0)
    WPB: tl.constexpr = 16 * BITS
    SPW: tl.constexpr = 32 // BITS
    SPG: tl.constexpr = GROUP // _W
    NWIN: tl.constexpr = SPW // SPG if SPG < SPW else 1
    WL: tl.constexpr = SPW // NWIN
    GPB: tl.constexpr = _BLOCK_K // GROUP
    GPW: tl.constexpr = WL // SPG if WL >= SPG else 0
    NT: tl.constexpr = WPB // _W
    RS: tl.constexpr = _R // SLICES
    row0 = pid_n * _R
    t1 = tl.arange(0, NT)
    w1 = tl.arange(0, _W)
    rr = tl.arange(0, RS)[None, None, :]
    x_col = x_ptr + t1[:, None] * (SPW * _W) + w1[None, :]
    kcol = t1[:, None] * (SPW * _W) + w1[None, :]
    g_t = (t1 * SPW) // SPG
    s_t = s_ptr + g_t[:, None, None]
    live = tl.full([NT, 1, RS], 1, tl.int32) > 0
    s_r0 = s_t + tl.minimum(row0 + rr, N - 1) * stride_sn
    s_r1 = s_t + tl.minimum(row0 + RS + rr, N - 1) * stride_sn
    s_r2 = s_t + tl.minimum(row0 + 2 * RS + rr, N - 1) * stride_sn
    s_r3 = s_t + tl.minimum(row0 + 3 * RS + rr, N - 1) * stride_sn
    a0 = tl.zeros([NT, _W, RS], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    for b in tl.range(b_start, b_end, num_stages=STAGES):
        base = (pid_n * n_blocks + b) * NT
        w0 = _tile(w_desc, base, 0, NT, RS)
        s00, s01, s02, s03 = _load_scales(s_r0, b * GPB, live, GPW, NWIN)
        w1_ = w0
        w2 = w0
        w3 = w0
        s10, s11, s12, s13 = s00, s01, s02, s03
        s20, s21, s22, s23 = s00, s01, s02, s03
        s30, s31, s32, s33 = s00, s01, s02, s03
        if SLICES == 4:
            w1_ = _tile(w_desc, base, 1, NT, RS)
            w2 = _tile(w_desc, base, 2, NT, RS)
            w3 = _tile(w_desc, base, 3, NT, RS)
            s10, s11, s12, s13 = _load_scales(s_r1, b * GPB, live, GPW, NWIN)
            s20, s21, s22, s23 = _load_scales(s_r2, b * GPB, live, GPW, NWIN)
            s30, s31, s32, s33 = _load_scales(s_r3, b * GPB, live, GPW, NWIN)
        a0, a1, a2, a3 = _idp_block(x_col, x_col, kcol, K, b * _BLOCK_K, inv, w0, w0, s00, s01, s02, s03, w1_, w1_,
                                    s10, s11, s12, s13, w2, w2, s20, s21, s22, s23, w3, w3, s30, s31, s32, s33, a0,
                                    a1, a2, a3, 0, BITS, OFF, GROUP, True, SLICES, ASM, False)
    y = tl.sum(tl.sum(a0, axis=1), axis=0)
    if SLICES == 4:
        y1 = tl.sum(tl.sum(a1, axis=1), axis=0)
        y2 = tl.sum(tl.sum(a2, axis=1), axis=0)
        y3 = tl.sum(tl.sum(a3, axis=1), axis=0)
        y = tl.reshape(tl.permute(tl.join(tl.join(y, y1), tl.join(y2, y3)), (2, 1, 0)), (_R,))
    y = y * (amax / XMAX)
    offs_n = row0 + tl.arange(0, _R)
    n_mask = offs_n < N
    if PARTIAL:
        finish_split(y, y, offs_n, n_mask, part_ptr, pid_k, stride_ps, N, cnt_ptr + pid_n, n_split,
                     out_ptr + offs_n, out_ptr + offs_n, False, False)
    else:
        store_output(out_ptr + offs_n, y, n_mask, out_ptr + offs_n, False)


def tma_linear(x, p, fmt, slices, stages, split, desc=None):
    spec = INT_SPECS[fmt]
    q, s = p["qweight"], p["scales"]
    n = s.shape[0]
    k = x.shape[1]
    n_blocks = q.shape[1] // (16 * spec.bits)
    nt = spec.bits
    if desc is None:
        desc = TensorDescriptor.from_tensor(q.view(-1, 16, slices, 16 // slices), [nt, 16, 1, 16 // slices])
    per, split, y, part, cnt = split_outputs(n, n_blocks, split, x.dtype, x.device)
    xmax = ops.int_dot_xmax(spec.bits, spec.offset, spec.group)
    tma_gemv_kernel[(-(-n // 16), split)](x, desc, s, y, part, cnt, n, k, n_blocks, per, split, s.stride(0),
                                          part.stride(0), BITS=spec.bits, OFF=spec.offset, GROUP=spec.group,
                                          XMAX=xmax, SLICES=slices, STAGES=stages, PARTIAL=split > 1,
                                          ASM=x.device.type == "cuda", num_warps=4)
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4,q2")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--small", action="store_true", help="small shapes (the interpreter's correctness check)")
    args = ap.parse_args()
    dev, shapes = device(args.small)
    if dev == "cuda":
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    g = torch.Generator(device=dev).manual_seed(0)
    failed = False
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        totals: dict[str, float] = {}
        for name, (n, k, split) in shapes.items():
            codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), generator=g, dtype=torch.int16,
                                  device=dev)
            scales = torch.rand((n, k // spec.group), generator=g, device=dev) * 0.01 + 0.001
            p = REPACK[fmt](codes, scales)
            x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
            ref = x.float() @ dequantize_packed(fmt, p, k).T
            wbytes = sum(t.numel() * t.element_size() for t in p.values())
            packs = copies(wbytes, lambda: {kk: t.clone() for kk, t in p.items()})
            cases = {"landed": lambda q: ops.int_linear_impl(x, q["qweight"], q["scales"], None, spec.bits,
                                                             spec.offset, spec.group, False)}
            for sl in ((1, 4) if spec.bits == 4 else (1,)):
                for st in map(int, args.stages.split(",")):
                    for sp in sorted({split, 2 * split, max(1, split // 2)}):
                        cases[f"tma s{sl} st{st} k{sp}"] = (
                            lambda q, sl=sl, st=st, sp=sp: tma_linear(x, q, fmt, sl, st, sp))
            line, ok = run_cases(cases, p, packs, ref, dev, totals)
            failed |= not ok
            print(f"{fmt:4s} {name:6s} {wbytes / 1e6:5.1f} MB | {line}", flush=True)
        per_layer(fmt, dict(sorted(totals.items(), key=lambda a: a[1])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
