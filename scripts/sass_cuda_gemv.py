"""SASS instructions of the hand-written CUDA GEMVs (`cuda_int`, `cuda_frag`, `cuda_rows`), without a GPU: compile
each format's variant for sm_90 with nvcc, disassemble it with triton's bundled cuobjdump, and count the kernel's
instructions by opcode, with the registers ptxas reports. A warp takes one 512-code block and the loops over it
are unrolled, so the count is close to what a thread executes.

The integer GEMVs at S2's shapes are latency- and issue-bound (bench/RESULTS.md), so a change to their inner
loops should first move these counts; the K-quant GEMV's frame rates followed them (twenty-fourth session).

Usage: python scripts/sass_cuda_gemv.py [--formats q4,q4_k,...] [--warps 5] [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton.backends.nvidia as nvidia_backend

from s2conv.runtime.kernels import cuda_frag, cuda_int, cuda_rows
from s2conv.runtime.kernels.layout import INT_SPECS

# format -> (module, Variant keyword arguments beside warps and the flags)
FORMATS = {
    "q4": (cuda_int, dict(bits=4, group=128, offset=8)),
    "q4_0": (cuda_int, dict(bits=4, group=32, offset=8, half_scales=True)),
    "q3": (cuda_int, dict(bits=3, group=128, offset=4)),
    "q2": (cuda_int, dict(bits=2, group=64, offset=2)),
    "tq2_0": (cuda_int, dict(bits=2, group=256, offset=2)),
    "q4_k": (cuda_frag, dict(bits=4, group=32)),
    "q3_k": (cuda_frag, dict(bits=INT_SPECS["q3_k"].bits, group=16)),
    "q2_k": (cuda_frag, dict(bits=2, group=16)),
    "fp8": (cuda_rows, dict(fp8=True)),
    "q8": (cuda_rows, dict(fp8=False)),
}
_OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def count(source: str, workdir: Path) -> tuple[str, collections.Counter]:
    """(registers, opcode counts) of one kernel source compiled for sm_90."""
    src, cubin = workdir / "k.cu", workdir / "k.cubin"
    src.write_text(source)
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", str(src), "-o", str(cubin)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"nvcc failed: {r.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    tool = Path(os.path.dirname(nvidia_backend.__file__)) / "bin" / "cuobjdump"
    sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True).stdout
    ops = collections.Counter(m.group(1).split(".")[0] for m in _OPCODE.finditer(sass))
    return (regs.group(1) if regs else "?"), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--warps", type=int, default=5, help="512-code blocks of K (S2's K = 2560: 5)")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per kernel")
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        sys.exit("needs nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            if fmt not in FORMATS:
                sys.exit(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
            module, kw = FORMATS[fmt]
            for gated in (False, True):
                v = module.Variant(args.warps, **kw, gated=gated, pdl=True,
                                   min_blocks=module.min_blocks(gated, args.warps))
                regs, ops = count(v.source(), Path(tmp))
                top = " ".join(f"{k}:{n}" for k, n in ops.most_common(args.top))
                print(f"{fmt:6} {'gated' if gated else 'plain':5} regs {regs:>3} instructions {sum(ops.values()):5}  "
                      f"{top}")


if __name__ == "__main__":
    main()
