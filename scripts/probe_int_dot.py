"""Probe: the dp2a integer GEMV path (`Config.int_dot`) against the float path of the same kernel, per format, at
S2's four layer shapes, M = 1, graph-timed with rotating weights (L2 holds none), with a correctness check of each
variant against the dequantized fp32 reference (`bench.output_error`).

    python scripts/probe_int_dot.py [--formats q4,q8,...] [--variants float,dot4,...]    (a CUDA GPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import torch
import triton
import triton.language as tl

from s2conv.bench import output_error
from s2conv.runtime.kernels import INT_SPECS, REPACK, cat_rows, dequantize_packed, ops

SHAPES = {"wqkv": (6144, 2560, False), "wo": (2560, 4096, False), "w1|w3": (9728, 2560, True),
          "w2": (2560, 9728, False)}


def variants(fmt: str, n: int, k: int, gated: bool) -> dict[str, ops.Config]:
    spec = INT_SPECS[fmt]
    base = ops.default_config("int", spec.bits, n, k, 1, torch.device("cuda"), gated, spec.group)
    fl = dataclasses.replace(base, int_dot=False, slices=1, num_warps=4)
    return {"float": fl,
            "default": base,
            "dot4 4w": dataclasses.replace(base, int_dot=True, slices=4, num_warps=4),
            "dot1 4w": dataclasses.replace(base, int_dot=True, slices=1, num_warps=4),
            "dot1 8w": dataclasses.replace(base, int_dot=True, slices=1, num_warps=8),
            "dot4 split x2": dataclasses.replace(base, int_dot=True, slices=4, num_warps=4, split=2 * base.split)}


@triton.jit
def stream_kernel(w_ptr, out_ptr, words, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    """Read `words` contiguous int32 per program (program i: the i-th such piece), CHUNK words per load and UNROLL
    loads in flight per step; xor them into one int so that nothing is dead code. The ceiling of a kernel whose
    programs stream one row group each."""
    base = w_ptr + tl.program_id(0).to(tl.int64) * words
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], tl.int32)
    for start in range(0, words, CHUNK * UNROLL):
        for u in tl.static_range(UNROLL):
            acc ^= tl.load(base + start + u * CHUNK + offs, mask=start + u * CHUNK + offs < words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def stream_ceiling(qweight: torch.Tensor, copies: list[torch.Tensor]) -> str:
    """us of `stream_kernel` over qweight's row groups (one program each) for a few chunk/unroll/warp choices."""
    groups = qweight.shape[0] // 16
    words = qweight.numel() // groups
    out = torch.empty(groups, dtype=torch.int32, device="cuda")
    res = []
    for chunk, unroll, warps in ((512, 1, 4), (512, 2, 4), (1024, 2, 4), (256, 4, 2), (2048, 1, 8)):
        it = itertools.count()
        us = ops.graph_time_ms(lambda: stream_kernel[(groups,)](copies[next(it) % len(copies)], out, words,  # noqa
                                                                CHUNK=chunk, UNROLL=unroll, num_warps=warps),
                               calls=2 * len(copies), reps=10) * 1e3
        res.append(f"{chunk}x{unroll}/{warps}w {us:.1f}")
    return "stream " + " ".join(res)


def random_pack(fmt: str, n: int, k: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    spec = INT_SPECS[fmt]
    codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), generator=g, dtype=torch.int16, device="cuda")
    shape = (n, k // spec.group) if spec.group else (n,)
    scales = torch.rand(shape, generator=g, device="cuda") * 0.01 + 0.001
    args = (codes, scales) + ((torch.rand(shape, generator=g, device="cuda") * 0.01,) if spec.has_min else ())
    p = REPACK[fmt](*args)
    return p, dequantize_packed(fmt, p, k)


def layer_case(fmt: str, n: int, k: int, gated: bool, m: int, g: torch.Generator):
    """One S2 linear in `fmt` with random codes: (packed weight, its dequantized fp32 rows (w1 over w3 when gated),
    bf16 x [m, k], the fp32 reference output, rotating copies of the packed weight (> 120 MB in all, so that L2
    holds none between calls))."""
    p, w = random_pack(fmt, n, k, g)
    if gated:
        p3, w3 = random_pack(fmt, n, k, g)
        p, w = cat_rows(p, p3), torch.cat([w, w3])
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    ref = x.float() @ w.T
    if gated:
        ref = torch.nn.functional.silu(ref[:, :n]) * ref[:, n:]
    wbytes = sum(t.numel() * t.element_size() for t in p.values())
    packs = [{kk: t.clone() for kk, t in p.items()} for _ in range(max(2, int(120e6 // wbytes) + 1))]
    return p, w, x, ref, packs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="q4,q3,tq2_0", help="formats in the interleaved layout")
    ap.add_argument("--variants", default="")
    ap.add_argument("--stream", action="store_true", help="also time a plain streaming read of each qweight")
    args = ap.parse_args()
    print("device:", torch.cuda.get_device_name())
    g = torch.Generator(device="cuda").manual_seed(0)
    failed = False
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        totals: dict[str, float] = {}
        for name, (n, k, gated) in SHAPES.items():
            p, _, x, ref, packs = layer_case(fmt, n, k, gated, 1, g)
            wbytes = sum(t.numel() * t.element_size() for t in p.values())
            copies = len(packs)
            line = []
            for vname, cfg in variants(fmt, n, k, gated).items():
                if args.variants and vname not in args.variants.split(","):
                    continue
                call = lambda q: ops.int_linear_impl(x, q["qweight"], q["scales"], q.get("mins"), spec.bits,  # noqa
                                                     spec.offset, spec.group, gated, config=cfg)
                err, max_rel, ok = output_error(call(p), ref)
                failed |= not ok
                it = itertools.count()
                us = ops.graph_time_ms(lambda: call(packs[next(it) % copies]), calls=2 * copies, reps=10) * 1e3
                totals[vname] = totals.get(vname, 0.0) + us
                line.append(f"{vname} {us:.1f}" + ("" if ok else f" WRONG({err:.1e},{max_rel:.1e})"))
            if args.stream:
                line.append(stream_ceiling(p["qweight"], [q["qweight"] for q in packs]))
            print(f"{fmt:5s} {name:6s} {wbytes / 1e6:5.1f} MB floor {wbytes / 3.0e6:5.1f} us | " + " | ".join(line))
        print(f"{fmt:5s} per layer: " + ", ".join(f"{v} {t:.1f} us" for v, t in totals.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
