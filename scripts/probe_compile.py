"""Probe: how the ahead-of-time compile of `kernels.launch.compile_launches` scales with threads.

Notes the launches of one format's linears at S2 Pro's four shapes (w1|w3 gated) and M = 1, 64 and 512 (the GEMV
and the small-M GEMM variants), then compiles them with an empty Triton cache on the given number of threads.

    python scripts/probe_compile.py THREADS [FORMATS]      (a CUDA GPU; e.g. 1, 4, 16 and q2_k,q4)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # before triton reads it

import torch  # noqa: E402

from s2conv.runtime.kernels import GATED_KERNELS, INT_SPECS, KERNELS, REPACK, cat_rows  # noqa: E402
from s2conv.runtime.kernels.launch import compile_launches, recording  # noqa: E402

SHAPES = ((6144, 2560, False), (2560, 4096, False), (9728, 2560, True), (2560, 9728, False))


def packed(fmt: str, n: int, k: int) -> dict:
    spec = INT_SPECS[fmt]
    codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), dtype=torch.int8, device="cuda")
    shape = (n, k // spec.group) if spec.group else (n,)
    scales = [torch.rand(shape, device="cuda") * 0.01 for _ in range(2 if spec.has_min else 1)]
    return REPACK[fmt](codes, *scales)


def main() -> None:
    threads = int(sys.argv[1])
    launches = []
    for fmt in (sys.argv[2] if len(sys.argv) > 2 else "q2_k,q4").split(","):
        for n, k, gated in SHAPES:
            p = cat_rows(packed(fmt, n, k), packed(fmt, n, k)) if gated else packed(fmt, n, k)
            for m in (1, 64, 512):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                with recording() as noted:
                    (GATED_KERNELS if gated else KERNELS)[fmt](x, p)
                launches += noted
    t = time.perf_counter()
    compile_launches(launches, threads)
    print(f"{torch.cuda.get_device_name()}: {threads} threads, {len(launches)} launches compiled in "
          f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
