"""Probe the CUDA q4 GEMV (`kernels/cuda_int.py`) against the Triton integer GEMV at S2 Pro's shapes, M = 1.

Per shape: both kernels checked against the reference (dequantize + F.linear in fp32) on fresh random inputs, then
graph-timed with rotating weight copies (L2 holds none), beside a load-only kernel of the same bytes; also per
layer (wqkv + wo + w1|w3 + w2). wqkv and w1|w3 take their RMSNorm (the CUDA GEMV folds it; the Triton time is
given with and without its norm launch), wo and w2 the residual. Every shape runs on both kernels, whatever K
(the runtime keeps K above S2CONV_CUDA_GEMV_MAX_K on Triton).

Usage: python scripts/probe_cuda_gemv.py
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from s2conv.runtime.kernels import REPACK, cat_rows, dequantize_packed, ops, split_rows
from s2conv.runtime.kernels.cuda_int import int_gemv
from s2conv.runtime.kernels.ops import graph_time_ms
from probe_gemv import roofline_us  # scripts/ is on sys.path when run as a script

SHAPES = [("wqkv", 6144, 2560, False), ("wo", 2560, 4096, False), ("w13", 9728, 2560, True),
          ("w2", 2560, 9728, False)]
ROTATE = 200e6
EPS = 1e-6


def q4_weight(n: int, k: int, gated: bool) -> dict:
    parts = []
    for _ in range(2 if gated else 1):
        codes = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
        parts.append(REPACK["q4"](codes, torch.rand(n, k // 128, device="cuda") * 0.01))
    return cat_rows(*parts) if gated else parts[0]


def reference(x, p, k, gated, residual, g):
    xf = x.float()
    if g is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * g.float()
    if gated:
        w1, w3 = (dequantize_packed("q4", half, k) for half in split_rows(p))
        return F.silu(xf @ w1.T) * (xf @ w3.T)
    y = xf @ dequantize_packed("q4", p, k).T
    return y if residual is None else y + residual.float()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    print(torch.cuda.get_device_name())
    totals = {"triton": 0.0, "triton without norms": 0.0, "cuda": 0.0, "load-only": 0.0}
    for name, n, k, gated in SHAPES:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        g = None if name in ("wo", "w2") else (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        res = torch.randn(1, n, device="cuda", dtype=torch.bfloat16) if g is None else None
        one = q4_weight(n, k, gated)
        nbytes = sum(t.numel() * t.element_size() for t in one.values())
        copies = [one] + [q4_weight(n, k, gated) for _ in range(max(1, int(ROTATE // nbytes)))]
        ref = reference(x, one, k, gated, res, g)
        cfg = ops.default_config("int", 4, n, k, 1, x.device, gated, 128)  # an explicit config: the Triton GEMV
        calls = {
            "triton": lambda p: ops.int_linear_impl(x, p["qweight"], p["scales"], None, 4, 8, 128, gated, cfg,
                                                    residual=res, norm_weight=g, norm_eps=EPS),
            "cuda": lambda p: int_gemv(x, p["qweight"], p["scales"], gated, residual=res, norm_weight=g,
                                       norm_eps=EPS),
        }
        times = {"load-only": roofline_us(nbytes)}
        for label, call in calls.items():
            err = rel_err(call(one), ref)
            if err > 2e-2:
                raise SystemExit(f"{name} {label}: relative error {err:.2e}")
            it = itertools.cycle(copies)
            times[label] = graph_time_ms(lambda: call(next(it))) * 1e3
        # the Triton GEMV alone: a layer chains its norm through the producer's epilogue instead of a launch
        it = itertools.cycle(copies)
        times["triton without norms"] = graph_time_ms(lambda: ops.int_linear_impl(
            x, next(it)["qweight"], one["scales"], None, 4, 8, 128, gated, cfg, residual=res)) * 1e3
        for label, us in times.items():
            totals[label] += us
        print(f"{name:5s} {nbytes / 1e6:5.1f} MB  " + "  ".join(f"{k} {v:5.1f} us" for k, v in times.items()),
              flush=True)
    print("per layer: " + "  ".join(f"{k} {v:5.1f} us" for k, v in totals.items()))


if __name__ == "__main__":
    main()
