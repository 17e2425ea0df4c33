"""Probe: K-quant scales in two levels for the tensor-core kernel (`layout.repack_int`'s two levels): each
group's scale and min as bytes under an fp32 (d, dmin) per super-block, against the fp32 scale and min per group
the kernel reads today, for q4_k and q2_k at S2's four layer shapes, M = 1, graph-timed with rotating weights.
Both forms decode to the same weights; each is checked against the dequantized reference first.

    python scripts/probe_kq.py [--formats q4_k,q2_k]
    TRITON_INTERPRET=1 python scripts/probe_kq.py --small     (the correctness check at small shapes)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from probe_variants import copies, device, per_layer, run_cases  # noqa: E402

from s2conv.runtime.kernels import ops  # noqa: E402
from s2conv.runtime.kernels.layout import INT_SPECS, fragment_unit, pack_fragment_codes  # noqa: E402

SUB_MAX = {"q4_k": 63, "q2_k": 15}  # the formats' sub-block scale and min ranges (6 and 4 bits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4_k,q2_k")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    dev, shapes = device(args.small or os.environ.get("TRITON_INTERPRET") == "1")
    torch.manual_seed(0)
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        kq = 256 // spec.group
        totals: dict[str, float] = {}
        ok_all = True
        for shape, (n, k, _) in shapes.items():
            k = -(-k // 256) * 256
            codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), device=dev)
            groups = k // spec.group
            sc = torch.randint(0, SUB_MAX[fmt] + 1, (n, groups), device=dev)
            m = torch.randint(0, SUB_MAX[fmt] + 1, (n, groups), device=dev)
            sup = (torch.rand(n, groups // kq, 2, device=dev) * 0.01).half().float()
            scales = sc * sup[..., 0].repeat_interleave(kq, 1)
            mins = m * sup[..., 1].repeat_interleave(kq, 1)
            sub = (sc | (m << 8)).to(torch.int16)
            x = torch.randn(1, k, device=dev).to(torch.bfloat16)
            w = codes.float() * scales.repeat_interleave(spec.group, 1) - mins.repeat_interleave(spec.group, 1)
            ref = x.float() @ w.T
            assert fragment_unit(spec.bits, spec.group) <= 256
            q = pack_fragment_codes(codes, spec.bits, spec.offset, spec.group)
            per_group = (q, scales.contiguous(), mins.contiguous())
            two_level = (q, sub.contiguous(), sup.contiguous())
            nbytes = sum(t.numel() * t.element_size() for t in per_group)
            packs = {name: (copies(nbytes, lambda p=p: tuple(t.clone() for t in p)) if dev == "cuda" else [p])
                     for name, p in (("per group", per_group), ("two levels", two_level))}
            line = []
            for name in ("per group", "two levels"):
                def call(p):
                    return ops.fragment_linear_impl(x, p[0], p[1], spec.bits, spec.offset, spec.group, False,
                                                    mins=p[2])
                ln, ok = run_cases({name: call}, packs[name][0], packs[name], ref, dev, totals)
                ok_all &= ok
                line.append(ln)
            print(f"{fmt} {shape} [{n}x{k}]: " + " | ".join(line), flush=True)
        per_layer(fmt, totals)
        print(f"{fmt}: every case right: {ok_all}", flush=True)


if __name__ == "__main__":
    main()
