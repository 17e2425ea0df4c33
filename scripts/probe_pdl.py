"""Probe: cost per kernel of a chain of small dependent Triton kernels in one CUDA graph, with and without
programmatic dependent launch (PDL), and whether the chain's result stays right."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _step(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)


def chain(pdl: bool, n_kernels: int, n: int, programs: int):
    a = torch.zeros(n, device="cuda")
    b = torch.zeros(n, device="cuda")
    block = triton.next_power_of_2(triton.cdiv(n, programs))

    def body():
        src, dst = a, b
        for _ in range(n_kernels):
            _step[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, PDL=pdl, launch_pdl=pdl)
            src, dst = dst, src

    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    a.zero_()
    g.replay()
    torch.cuda.synchronize()
    ok = bool((a if n_kernels % 2 == 0 else b).eq(n_kernels).all())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_kernels)
    return sorted(times)[2], ok


def main():
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    for n, programs in ((4096, 4), (2560 * 16, 132), (1 << 20, 528)):
        for pdl in (False, True):
            us, ok = chain(pdl, 1000, n, programs)
            print(f"n={n:8d} programs={programs:4d} pdl={pdl!s:5}: {us:6.2f} us/kernel  correct={ok}")


if __name__ == "__main__":
    main()
