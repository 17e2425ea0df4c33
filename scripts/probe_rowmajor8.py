"""Probe: 8-bit-code ggml formats (q8_0, q6_k, q5_k, ...) read row-major by the float GEMV with a scale per group
(`ops.float_linear_impl(.., group=)`, their kernel since the fifteenth session; the interleaved layout's dp2a
kernel it was compared with no longer takes 8-bit codes) against q8 (one scale per row), at
S2 Pro's four layer shapes, M = 1, graph-timed with rotating weight copies (L2 holds none). Each variant is checked
against the dequantized reference first.

Usage: python scripts/probe_rowmajor8.py [--formats q8_0,q6_k,q5_k] [--sweep] [--m 32]
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F

from s2conv.runtime.kernels import INT_SPECS, layout, ops
from s2conv.runtime.kernels.ops import Config, graph_time_ms

SHAPES = [("wqkv", 6144, 2560, False), ("wo", 2560, 4096, False), ("w13", 9728, 2560, True),
          ("w2", 2560, 9728, False)]
ROTATE = 200e6


def weights(fmt: str, rows: int, k: int):
    spec = INT_SPECS[fmt]
    codes = torch.randint(spec.code_min, spec.code_max + 1, (rows, k), dtype=torch.int16, device="cuda")
    s = torch.rand(rows, k // spec.group, device="cuda") * 0.01
    m = torch.rand(rows, k // spec.group, device="cuda") * 0.01 if spec.has_min else None
    return codes, s, m


def reference(x, codes, s, m, group, gated):
    w = codes.float() * s.repeat_interleave(group, 1)
    if m is not None:
        w = w - m.repeat_interleave(group, 1)
    y = x.float() @ w.T
    if gated:
        n = y.shape[1] // 2
        y = F.silu(y[:, :n]) * y[:, n:]
    return y


def check(name, y, ref):
    err = ((y.float() - ref).norm() / ref.norm()).item()
    if err > 2e-2:
        raise SystemExit(f"{name}: relative error {err:.2e}")
    return err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q8_0,q6_k,q5_k")
    ap.add_argument("--sweep", action="store_true", help="also sweep the row-major launch configs")
    ap.add_argument("--m", type=int, default=1, help="rows of x (> 1: the GEMMs, whose sweep also varies "
                    "S2CONV_GROUP_DOT)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    totals = {}
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        for name, n, k, gated in SHAPES:
            rows = 2 * n if gated else n
            x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
            count = max(2, int(ROTATE // (rows * k)))
            raw = [weights(fmt, rows, k) for _ in range(count)]
            # row-major int8 + group scales
            sign = layout.row_major_sign(spec)  # q3_k: negated codes and scales fit
            rm = [((c * sign).to(torch.int8), s * sign, m) for c, s, m in raw]
            ref = reference(x, *raw[0], spec.group, gated)
            e_rm = check(f"{fmt} {name} row-major", ops.float_linear_impl(x, rm[0][0], rm[0][1], gated,
                                                                          group=spec.group, mins=rm[0][2]), ref)
            it_r = itertools.cycle(rm)

            def call(cfg=None):
                w, s, m = next(it_r)
                return ops.float_linear_impl(x, w, s, gated, cfg, group=spec.group, mins=m)

            t_rm = graph_time_ms(call) * 1e3
            line = f"{fmt:5s} {name:5s} row-major {t_rm:6.1f} us  (error {e_rm:.1e})"
            best = t_rm
            if args.sweep:
                res = []
                splits = (1, 2, 4) if n < 6144 else (1,)
                if args.m == 1:
                    cfgs = [("", Config(bn, sp, 4, 3, block_k=bk, pipeline=pipe))
                            for bn, sp, bk, pipe in itertools.product((8, 16), splits, (256, 512), (1, 3, 4))]
                else:
                    bm = ops.default_config("float", 8, n, k, args.m, x.device).block_m
                    cfgs = [(dot, Config(bn, 1, 4, 3, block_m=bm, block_k=max(bk, spec.group)))
                            for dot, bn, bk in itertools.product(("0", "1"), (32, 64, 128), (128, 256))]
                for dot, cfg in cfgs:
                    if dot:
                        os.environ["S2CONV_GROUP_DOT"] = dot
                    try:
                        res.append((graph_time_ms(lambda: call(cfg)) * 1e3, f"dot={dot} {cfg}"))
                    except Exception as e:  # noqa: BLE001
                        print("   config failed:", cfg, type(e).__name__, str(e)[:200])
                os.environ.pop("S2CONV_GROUP_DOT", None)
                res.sort()
                best = min(best, res[0][0])
                line += "  best " + "; ".join(f"{u:5.1f} {c}" for u, c in res[:2])
            print(line, flush=True)
            tot = totals.setdefault(fmt, [0.0, 0.0])
            tot[0] += t_rm
            tot[1] += best
        # q8 (per-row scales) at the same shapes, for reference
    for name, n, k, gated in SHAPES:
        rows = 2 * n if gated else n
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        ws = [(torch.randint(-127, 128, (rows, k), dtype=torch.int8, device="cuda"),
               torch.rand(rows, device="cuda") * 0.01) for _ in range(max(2, int(ROTATE // (rows * k))))]
        it = itertools.cycle(ws)
        t = graph_time_ms(lambda: ops.float_linear_impl(x, *next(it), gated)) * 1e3
        tot = totals.setdefault("q8 (per row)", [0.0, 0.0])
        tot[0] += t
        tot[1] += t
    print("\nper layer (wqkv + wo + w1|w3 + w2), us: default config / best of the sweep")
    for fmt, (a, b) in totals.items():
        print(f"  {fmt:13s} {a:6.1f} / {b:6.1f}")


if __name__ == "__main__":
    main()
