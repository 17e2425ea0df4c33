"""Probe the M = 1 GEMV kernels at S2 Pro's shapes: launch-config sweep, PDL on/off, against a load-only roofline
of the same byte count and against cuBLAS bf16. Graph-timed, rotating weight copies (L2 holds none).

Usage: python scripts/probe_gemv.py [--formats q4,q8,q2,bf16,fp8]   (PROBE_PDL=0 leaves out the PDL runs)
       python scripts/probe_gemv.py --unroll --formats q4,q8_0,q3   (the dp2a GEMV's blocks in a loop against
                                                                    unrolled, `ops.idp_unroll`, at each split)
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from s2conv.runtime.kernels import INT_SPECS, REPACK, cat_rows, layout, ops
from s2conv.runtime.kernels.ops import Config, graph_time_ms

SHAPES = [("wqkv", 6144, 2560, False), ("wo", 2560, 4096, False), ("w13", 9728, 2560, True),
          ("w2", 2560, 9728, False)]
ROTATE = 200e6


@triton.jit
def _load_only(p, out, n_words, PER: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(0) * PER
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, PER, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n_words, other=0)
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


def roofline_us(nbytes: int) -> float:
    words = nbytes // 4
    copies = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda")
              for _ in range(max(2, int(ROTATE // nbytes)))]
    best = None
    for per in (2048, 4096, 8192, 16384):
        out = torch.empty(triton.cdiv(words, per), dtype=torch.int32, device="cuda")
        it = itertools.cycle(copies)
        ms = graph_time_ms(lambda: _load_only[(out.numel(),)](next(it), out, words, PER=per, BLOCK=1024,
                                                              num_warps=4))
        best = ms if best is None else min(best, ms)
    return best * 1e3


def int_copies(fmt, n, k, gated, count):
    spec = INT_SPECS[fmt]
    if layout.uses_row_major_layout(spec):
        raise SystemExit(f"{fmt} stays row-major (a float-kernel format): scripts/probe_rowmajor8.py probes it")
    out = []
    for _ in range(count):
        parts = []
        for _ in range(2 if gated else 1):
            codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), dtype=torch.int8, device="cuda")
            shape = (n, k // spec.group) if spec.group else (n,)
            sc = [torch.rand(shape, device="cuda") * 0.01]
            if spec.has_min:
                sc.append(torch.rand(shape, device="cuda") * 0.01)
            parts.append(REPACK[fmt](codes, *sc))
        out.append(cat_rows(*parts) if gated else parts[0])
    return out


def int_configs(fmt: str, n_blocks: int) -> list[Config]:
    """The integer GEMV sweep: split-K, warps and row slices on the dp2a path where the format has one
    (`ops.int_dot_xmax`), else split-K and warps on the float-x path."""
    spec = INT_SPECS[fmt]
    splits = sorted({1, 2, 3, 4, 5, 8, n_blocks} & set(range(1, n_blocks + 1)))
    if ops.int_dot_xmax(spec.bits, spec.offset, spec.group):
        return [Config(16, sp, w, 1, int_dot=True, slices=sl)
                for w, sp, sl in itertools.product((2, 4, 8), splits, (1, 4))]
    return [Config(16, sp, w, 1) for w, sp in itertools.product((2, 4, 8), splits)]


def float_configs(n: int) -> list[Config]:
    """The float GEMV sweep: rows per program, split-K (only where N leaves the GPU short of programs), warps, K
    step, loop pipeline stages."""
    splits = (1, 2, 4) if n < 6144 else (1,)
    return [Config(bn, sp, w, 3, block_k=bk, pipeline=pipe)
            for bn, sp, w, bk, pipe in itertools.product((8, 16, 32), splits, (4, 8), (256, 512), (3, 4))]


def probe_float(fmt: str, name: str, n: int, k: int, gated: bool, x: torch.Tensor, pdls: list[str]) -> None:
    """bf16, fp8 or q8 (per-row scales) at one shape: cuBLAS bf16, the default config, the sweep's best three."""
    rows = 2 * n if gated else n
    bf16 = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for _ in range(max(2, int(ROTATE // (rows * k * 2))))]
    cub = graph_time_ms(lambda it=itertools.cycle(bf16): F.linear(x, next(it))) * 1e3
    if fmt == "fp8":
        ws = [(w.to(torch.float8_e4m3fn), torch.rand(rows, device="cuda") * 0.01)
              for w in bf16[:max(2, int(ROTATE // (rows * k)))]]
    elif fmt == "q8":  # int8 codes, row-major like fp8
        ws = [(torch.randint(-127, 128, (rows, k), dtype=torch.int8, device="cuda"),
               torch.rand(rows, device="cuda") * 0.01) for _ in range(max(2, int(ROTATE // (rows * k))))]
    else:
        ws = [(w, None) for w in bf16]
    nbytes = rows * k * (1 if fmt in ("fp8", "q8") else 2)
    it = itertools.cycle(ws)

    def call(cfg):
        w, sc = next(it)
        return ops.float_linear_impl(x, w, sc, gated, cfg)

    for pdl in pdls:
        os.environ["S2CONV_PDL"] = pdl
        default = graph_time_ms(lambda: call(None)) * 1e3
        res = []
        for cfg in float_configs(n):
            try:
                res.append((graph_time_ms(lambda: call(cfg)) * 1e3, str(cfg)))
            except Exception:  # noqa: BLE001
                continue
        res.sort()
        roof = roofline_us(nbytes)
        print(f"{name:5s} {nbytes / 1e6:6.1f} MB  cuBLAS bf16 {cub:6.1f} us  pdl={pdl} default {default:6.1f} us  "
              f"roofline {roof:5.1f} us")
        for us, c in res[:3]:
            print(f"      {us:6.1f} us {c}")


def probe_unroll(fmt: str) -> None:
    """us per shape for splits 1-8: the dp2a loop / every program's blocks unrolled (whatever idp_unroll says)."""
    spec = INT_SPECS[fmt]
    rule = ops.idp_unroll
    for name, n, k, gated in SHAPES:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        one = int_copies(fmt, n, k, gated, 1)[0]
        nbytes = sum(t.numel() * t.element_size() for t in one.values())
        it = itertools.cycle([one] + int_copies(fmt, n, k, gated, max(1, int(ROTATE // nbytes))))
        default = ops.default_config("int", spec.bits, n, k, 1, x.device, gated, spec.group)
        row = []
        for split in (1, 2, 3, 4, 5, 8):
            cfg = Config(16, split, 4, 1, int_dot=True, slices=default.slices)
            times = []
            for unrolled in (False, True):
                ops.idp_unroll = (lambda per, sp, g: per) if unrolled else (lambda per, sp, g: 1)

                def call():
                    p = next(it)
                    return ops.int_linear_impl(x, p["qweight"], p["scales"], None, spec.bits, spec.offset,
                                               spec.group, gated, cfg)

                times.append(graph_time_ms(call) * 1e3)
            row.append(f"split {split} {times[0]:5.1f} / {times[1]:5.1f}")
        ops.idp_unroll = rule
        print(f"{fmt} {name:5s} (default split {default.split}): " + ", ".join(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="q4,q8,q2,bf16")
    ap.add_argument("--unroll", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    if args.unroll:
        for fmt in args.formats.split(","):
            probe_unroll(fmt)
        return
    pdls = os.environ.get("PROBE_PDL", "0,1").split(",")
    for fmt in args.formats.split(","):
        print(f"\n== {fmt}")
        for name, n, k, gated in SHAPES:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            if fmt in ("bf16", "fp8", "q8"):
                probe_float(fmt, name, n, k, gated, x, pdls)
                continue
            spec = INT_SPECS[fmt]
            one = int_copies(fmt, n, k, gated, 1)[0]
            nbytes = sum(t.numel() * t.element_size() for t in one.values())
            copies = [one] + int_copies(fmt, n, k, gated, max(1, int(ROTATE // nbytes)))
            it = itertools.cycle(copies)

            def call(cfg):
                p = next(it)
                return ops.int_linear_impl(x, p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset,
                                           spec.group, gated, cfg)

            n_blocks = -(-k // 512)
            res = {}
            for pdl in pdls:
                os.environ["S2CONV_PDL"] = pdl
                res[(pdl, "default")] = graph_time_ms(lambda: call(None)) * 1e3
                for cfg in int_configs(fmt, n_blocks):
                    try:
                        res[(pdl, cfg)] = graph_time_ms(lambda: call(cfg)) * 1e3
                    except Exception:  # noqa: BLE001
                        continue
            roof = roofline_us(nbytes)
            for pdl in pdls:
                ranked = sorted((v, str(c)) for (p, c), v in res.items() if p == pdl)
                print(f"{name:5s} {nbytes / 1e6:6.1f} MB pdl={pdl} default {res[(pdl, 'default')]:6.1f} us  "
                      f"best {ranked[0][0]:6.1f} us {ranked[0][1]}  2nd {ranked[1][0]:6.1f} {ranked[1][1]}  "
                      f"roofline {roof:5.1f} us ({nbytes / roof / 1e3:5.0f} GB/s)")
    os.environ["S2CONV_PDL"] = "0"


if __name__ == "__main__":
    main()
