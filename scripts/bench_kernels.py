#!/usr/bin/env python3
"""Benchmark s2conv's fused GEMV/GEMM kernels at S2 Pro's linear shapes against cuBLAS bf16 and the HBM roofline.

Usage: python scripts/bench_kernels.py [--formats q4,q2] [--no-tune] [--m 1,16] [--libraries]
Prints a table; writes bench_kernels.json to $OUT when set. Exits 1 when any kernel disagrees with the reference.
--libraries also times, at M = 1 on the same shapes, tinygemm's int4 g128 (`aten._weight_int4pack_mm`, the kernel
behind torchao's int4 weight-only), torchao's `Int4WeightOnlyConfig` and gemlite's A16W8 (int8, fp8) and A16Wn
(4-bit g128, 2-bit g64) when those packages are installed. They see w13 as one [2N, K] linear (no silu).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from s2conv.bench import output_error
from s2conv.quant_formats import get_format
from s2conv.runtime.kernels import GATED_KERNELS, INT_SPECS, KERNELS, REPACK, cat_rows, dequantize_packed, layout, ops

SHAPES = [("wqkv", 6144, 2560), ("wo", 2560, 4096), ("w1", 9728, 2560), ("w2", 2560, 9728), ("w13", 9728, 2560)]
FORMATS = ["bf16", "fp8", "q8", "q4", "q3", "q2", "q8_0", "q4_0", "q4_k"]
ROTATE_BYTES = 160e6  # > 3x the H100's 50 MB L2: rotating copies of each weight keep it out of L2


def hbm_bandwidth() -> dict:
    """Large copy (bytes read + written) and a read-only reduction, GB/s."""
    a = torch.empty(2**30, dtype=torch.float32, device="cuda")  # 4 GiB
    a.uniform_()
    t_sum = triton.testing.do_bench(lambda: a.sum(), warmup=5, rep=200)
    half = a[: 2**29]
    b = torch.empty_like(half)
    t_copy = triton.testing.do_bench(lambda: b.copy_(half), warmup=5, rep=200)
    res = {"read_GBps": a.numel() * 4 / t_sum / 1e6, "copy_GBps": 2 * half.numel() * 4 / t_copy / 1e6}
    del a, b, half
    torch.cuda.empty_cache()
    return res


def two_level(fmt: str) -> bool:
    """Whether a format's weights reach its kernel with the file's two-level scales (K-quants with mins in the
    fragment layout: `IntegerCodes.two_level`, kept by `layout.repack_int`), found by quantizing one super-block.
    Their fp32 scales and mins per 16 or 32 codes would be 2-4 bits a weight more than the model reads."""
    spec = INT_SPECS.get(fmt)
    if spec is None or not layout.uses_fragment_layout(spec):
        return False
    qf = get_format(fmt)
    data = torch.from_numpy(qf.quantize(torch.randn(1, 256)))
    return qf.integer_codes_torch(data, 256).two_level is not None


def random_weight(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple:
    dev = "cuda"
    if fmt == "bf16":
        return (torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02,)
    if fmt == "fp8":
        return ((torch.randn(n, k, device=dev, generator=gen) * 8).to(torch.float8_e4m3fn),
                torch.rand(n, device=dev, generator=gen) * 0.01)
    if fmt == "q8":  # row-major int8 codes with a scale per row (the float kernels)
        return (torch.randint(-127, 128, (n, k), device=dev, generator=gen, dtype=torch.int8),
                torch.rand(n, device=dev, generator=gen) * 0.01)
    spec = INT_SPECS[fmt]
    codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), device=dev, generator=gen, dtype=torch.int8)
    shape = (n, k // spec.group) if spec.group else (n,)
    if two_level(fmt):  # as the model's weights reach the kernel: sub-block bytes under (d, dmin) per 256 columns
        sc, m = (torch.randint(0, 64, shape, device=dev, generator=gen, dtype=torch.int16) for _ in range(2))
        if fmt == "q3_k":  # its signed 6-bit scale sc, the "min" 4 sc, dmin = d (`quant_formats/q3_k.py`)
            sc, m = sc - 32, 4 * (sc - 32)
        sup = torch.rand(n, k // 256, 2, device=dev, generator=gen) * 1e-3
        if fmt == "q3_k":
            sup[..., 1] = sup[..., 0]
        return codes, (sc & 0xFF) | (m << 8), sup
    scales = torch.rand(shape, device=dev, generator=gen) * 0.01
    if spec.has_min:
        return codes, scales, torch.rand(shape, device=dev, generator=gen) * 0.01
    return codes, scales


def nbytes(packed: dict) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


def graph_time_us(fn_list: list, reps: int = 20) -> float:
    """Mean time per call of the calls in fn_list, all captured in one CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fn_list[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fn_list:
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(fn_list))


def bench_one(fmt: str, name: str, n: int, k: int, m: int, tune: bool, gen: torch.Generator) -> dict:
    gated = name == "w13"
    if gated:
        a1, a3 = random_weight(fmt, n, k, gen), random_weight(fmt, n, k, gen)
        packed = cat_rows(REPACK[fmt](*a1), REPACK[fmt](*a3))
        fn = GATED_KERNELS[fmt]
    else:
        packed = REPACK[fmt](*random_weight(fmt, n, k, gen))
        fn = KERNELS[fmt]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    # correctness on fresh inputs, vs the fp32 reference of the packed weight
    w = dequantize_packed(fmt, packed, k)
    ref = x.float() @ w.T
    if gated:
        ref = F.silu(ref[:, :n]) * ref[:, n:]
    del w
    y = fn(x, packed)
    err, max_rel, ok = output_error(y, ref)
    wbytes = nbytes(packed)
    copies = max(2, min(64, math.ceil(ROTATE_BYTES / wbytes)))
    packs = [{kk: t.clone() for kk, t in packed.items()} for _ in range(copies)]
    rot = iter(range(10**9))
    tuned = None
    if tune and m == 1:  # GEMM configs (M > 1) stay default: each candidate is a slow compilation
        spec = INT_SPECS.get(fmt)
        if spec is not None and not layout.uses_row_major_layout(spec):
            key = ops._int_key(x, packed["scales"], spec.bits, spec.group, spec.has_min, gated)
            def run(cfg):
                p = packs[next(rot) % copies]
                return ops.int_linear_impl(x, p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset,
                                           spec.group, gated, cfg)
            kind = "int"
        else:  # float formats, and integer ones kept row-major (a scale per group)
            group = spec.group if spec is not None else 0
            key = ops._float_key(x, packed["weight"], "scales" in packed, gated, group)
            def run(cfg):
                p = packs[next(rot) % copies]
                return ops.float_linear_impl(x, p["weight"], p.get("scales"), gated, cfg, group=group,
                                             mins=p.get("mins"))
            kind = "float"
        cfg, _ = ops.tune(run, key, kind, m, calls=copies)
        tuned = cfg.__dict__
        y = fn(x, packed)  # the tuned config must agree too
        err2, _, ok2 = output_error(y, ref)
        ok, err = ok and ok2, max(err, err2)
    io_bytes = wbytes + x.numel() * 2 + m * n * 2
    calls = [lambda p=p: fn(x, p) for p in packs]
    t_graph = graph_time_us(calls)
    it = iter(range(10**9))
    t_bench = triton.testing.do_bench(lambda: fn(x, packs[next(it) % copies]), warmup=10, rep=100,
                                      return_mode="median") * 1e3
    res = dict(fmt=fmt, shape=name, n=n, k=k, m=m, bytes=io_bytes, us_graph=t_graph, us_bench=t_bench,
               GBps_graph=io_bytes / t_graph / 1e3, GBps_bench=io_bytes / t_bench / 1e3, rel_err=err, ok=ok,
               config=tuned)
    del packs, packed
    return res


def cublas_one(name: str, n: int, k: int, m: int, gen: torch.Generator) -> dict:
    gated = name == "w13"
    rows = 2 * n if gated else n
    w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    wbytes = w.numel() * 2
    copies = max(2, min(64, math.ceil(ROTATE_BYTES / wbytes)))
    ws = [w.clone() for _ in range(copies)]
    if gated:  # what the unfused runtime does: one GEMM over w1|w3, then silu * mul
        fn = lambda w_: (lambda h: F.silu(h[:, :n]) * h[:, n:])(F.linear(x, w_))
    else:
        fn = lambda w_: F.linear(x, w_)
    t_graph = graph_time_us([lambda w_=w_: fn(w_) for w_ in ws])
    it = iter(range(10**9))
    t_bench = triton.testing.do_bench(lambda: fn(ws[next(it) % copies]), warmup=10, rep=100,
                                      return_mode="median") * 1e3
    io = wbytes + x.numel() * 2 + m * n * 2
    return dict(fmt="cublas_bf16", shape=name, n=n, k=k, m=m, bytes=io, us_graph=t_graph, us_bench=t_bench,
                GBps_graph=io / t_graph / 1e3, GBps_bench=io / t_bench / 1e3, rel_err=0.0, ok=True, config=None)


def _int4_tinygemm(n: int, k: int, gen: torch.Generator):
    """(weight bytes, call(x)) for aten's tinygemm int4 GEMV, group 128, random codes and scales."""
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
    sz = torch.rand(k // 128, n, 2, device="cuda", generator=gen).to(torch.bfloat16)
    return packed.numel() * packed.element_size() + sz.numel() * 2, \
        lambda x, p=packed, s=sz: torch.ops.aten._weight_int4pack_mm(x, p, 128, s)


def _torchao_int4(n: int, k: int, gen: torch.Generator):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    quantize_(lin, Int4WeightOnlyConfig(group_size=128))
    return n * k // 2 + n * k // 128 * 4, lin


def _gemlite(kind: str, n: int, k: int, gen: torch.Generator):
    from gemlite.helper import A16W8_FP8, A16W8_INT8, A16Wn

    if kind in ("w8_int8", "w8_fp8"):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        cls = A16W8_INT8 if kind == "w8_int8" else A16W8_FP8
        return n * k + 4 * n, cls(device="cuda:0", dtype=torch.bfloat16).from_weights(w)
    bits, group = (4, 128) if kind == "w4_g128" else (2, 64)
    q = torch.randint(0, 2**bits, (n, k), device="cuda", dtype=torch.uint8, generator=gen)
    sc = torch.rand(n, k // group, device="cuda", generator=gen).to(torch.bfloat16) * 0.01
    zr = torch.full_like(sc, 2**bits / 2)
    layer = A16Wn(device="cuda:0", dtype=torch.bfloat16).from_weights(q, sc, zr, bits, group)
    return n * k * bits // 8 + 2 * sc.numel() * 2, layer


LIBRARIES = {
    "tinygemm_int4": _int4_tinygemm, "torchao_int4": _torchao_int4,
    "gemlite_w8_int8": lambda n, k, g: _gemlite("w8_int8", n, k, g),
    "gemlite_w8_fp8": lambda n, k, g: _gemlite("w8_fp8", n, k, g),
    "gemlite_w4_g128": lambda n, k, g: _gemlite("w4_g128", n, k, g),
    "gemlite_w2_g64": lambda n, k, g: _gemlite("w2_g64", n, k, g),
}


def library_one(lib: str, name: str, n: int, k: int, gen: torch.Generator) -> dict:
    """One library GEMV at M = 1 (w13 as one [2N, K] linear), graph-timed over rotating weight copies."""
    rows = 2 * n if name == "w13" else n
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    wbytes, first = LIBRARIES[lib](rows, k, gen)
    copies = max(2, min(32, math.ceil(ROTATE_BYTES / wbytes)))
    fns = [first] + [LIBRARIES[lib](rows, k, gen)[1] for _ in range(copies - 1)]
    for f in fns[:1]:
        f(x)  # compile / autotune outside the graph
    t_graph = graph_time_us([lambda f=f: f(x) for f in fns])
    io = wbytes + k * 2 + rows * 2
    return dict(fmt=lib, shape=name, n=n, k=k, m=1, bytes=io, us_graph=t_graph, us_bench=float("nan"),
                GBps_graph=io / t_graph / 1e3, GBps_bench=float("nan"), rel_err=float("nan"), ok=True, config=None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--m", default="1,16", help="batch rows to time (M=1: GEMV, larger: GEMM)")
    ap.add_argument("--no-tune", action="store_true", help="use the default launch configs")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new formats after this long")
    ap.add_argument("--libraries", action="store_true", help="also time tinygemm / torchao / gemlite at M = 1")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    bw = hbm_bandwidth()
    print(f"HBM: read-only sum {bw['read_GBps']:.0f} GB/s, copy (read+write) {bw['copy_GBps']:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ms = [int(v) for v in args.m.split(",")]
    rows = []
    hdr = f"{'format':<12}{'shape':<6}{'M':>3}{'MB':>8}{'us graph':>10}{'us bench':>10}{'GB/s':>7}{'%read':>7}{'vs cuBLAS':>10}  ok"
    print(hdr)
    base = {}
    for name, n, k in SHAPES:
        for m in ms:
            r = cublas_one(name, n, k, m, gen)
            base[(name, m)] = r["us_graph"]
            rows.append(r)
            print(f"{r['fmt']:<12}{name:<6}{m:>3}{r['bytes'] / 1e6:>8.1f}{r['us_graph']:>10.1f}{r['us_bench']:>10.1f}"
                  f"{r['GBps_graph']:>7.0f}{100 * r['GBps_graph'] / bw['read_GBps']:>6.0f}%{1.0:>10.2f}  -")
    libs = []
    for lib in LIBRARIES if args.libraries else ():
        for name, n, k in SHAPES:
            if name == "w1":
                continue
            try:
                r = library_one(lib, name, n, k, gen)
            except Exception as e:  # noqa: BLE001  (a missing package or an unsupported shape skips that row)
                print(f"{lib:<12}{name:<6} skipped: {type(e).__name__}: {str(e)[:80]}")
                break
            rows.append(r)
            if lib not in libs:
                libs.append(lib)
            print(f"{lib:<12}{name:<6}{1:>3}{r['bytes'] / 1e6:>8.1f}{r['us_graph']:>10.1f}{'-':>10}"
                  f"{r['GBps_graph']:>7.0f}{100 * r['GBps_graph'] / bw['read_GBps']:>6.0f}%"
                  f"{base[(name, 1)] / r['us_graph'] if (name, 1) in base else float('nan'):>10.2f}  -", flush=True)
        torch.cuda.empty_cache()
    failures = 0
    for fmt in args.formats.split(","):
        if time.time() - t0 > args.budget_s:
            print(f"time budget spent: skipping {fmt}")
            continue
        for name, n, k in SHAPES:
            for m in ms:
                r = bench_one(fmt, name, n, k, m, tune=not args.no_tune, gen=gen)
                rows.append(r)
                failures += not r["ok"]
                print(f"{fmt:<12}{name:<6}{m:>3}{r['bytes'] / 1e6:>8.1f}{r['us_graph']:>10.1f}{r['us_bench']:>10.1f}"
                      f"{r['GBps_graph']:>7.0f}{100 * r['GBps_graph'] / bw['read_GBps']:>6.0f}%"
                      f"{base[(name, m)] / r['us_graph']:>10.2f}  {'ok' if r['ok'] else 'MISMATCH %.2e' % r['rel_err']}"
                      f"  {r['config'] or ''}", flush=True)
        torch.cuda.empty_cache()
    # per-layer totals at M=1 (wqkv + wo + w13 fused + w2), graph time
    print("\nper-layer M=1 (wqkv + wo + gated w13 + w2), CUDA graph:")
    for fmt in ["cublas_bf16"] + libs + args.formats.split(","):
        parts = {r["shape"]: r for r in rows if r["fmt"] == fmt and r["m"] == 1}
        if all(s in parts for s in ("wqkv", "wo", "w13", "w2")):
            us = sum(parts[s]["us_graph"] for s in ("wqkv", "wo", "w13", "w2"))
            by = sum(parts[s]["bytes"] for s in ("wqkv", "wo", "w13", "w2"))
            print(f"  {fmt:<12} {us:7.1f} us/layer  {by / us / 1e3:6.0f} GB/s  {100 * by / us / 1e3 / bw['read_GBps']:4.0f}% of read BW")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_kernels.json"), "w") as f:
            json.dump({"gpu": props.name, "bandwidth": bw, "rows": rows, "seconds": time.time() - t0}, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s; {failures} correctness failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
