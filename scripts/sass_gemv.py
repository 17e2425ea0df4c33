"""Instructions per code of the integer GEMV, without a GPU: compile `int_gemv_kernel` for sm_90 with triton's
bundled ptxas, disassemble the main loop and count its SASS instructions by opcode.

The GEMV is issue-bound at S2's shapes (bench/RESULTS.md: Nsight Compute on an H100), so the instruction count of
its loop is the first thing a change to it should move; this measures it on any machine, before device time.
Other loops are listed by length: for q4_k the min correction runs one iteration per block (so its length / 64
adds to the main loop's per-code figure). The arguments get the specializations triton's JIT gives them at S2's shapes (16-byte aligned pointers, integers
divisible by 16). Mind the triton version: the device may run another one (its code generation differs).

Usage: python scripts/sass_gemv.py [--formats q4,q8,...] [--warps 4] [--blocks 5] [--dump DIR]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what ops.py's launches get (fused multiply-adds)

import triton  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from s2conv.runtime.kernels.layout import (BLOCK_K, INT_SPECS, uses_fragment_layout,  # noqa: E402
                                          uses_row_major_layout)
from s2conv.runtime.kernels.ops import default_config, int_dot_xmax  # noqa: E402
from s2conv.runtime.kernels.triton_int import int_gemv_kernel  # noqa: E402

_SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "out_ptr": "*bf16",
              "part_ptr": "*bf16", "cnt_ptr": "*i32", "r_ptr": "*bf16", "N": "i32", "K": "i32", "n_blocks": "i32",
              "blocks_per_split": "i32", "n_split": "i32", "magic": "i32", "stride_xm": "i32", "stride_wg": "i32",
              "w3_off": "i32", "stride_sn": "i32", "stride_om": "i32", "stride_ps": "i32", "stride_pm": "i32",
              "stride_rm": "i32", "g_ptr": "*bf16", "eps": "fp32", "ss_out": "*fp32", "zero_ptr": "*fp32",
              "rs_ptr": "*fp32", "rs_k": "i32", "rs_eps": "fp32", "gx_g": "*bf16", "gx_ptr": "*bf16"}
_NOT_DIVISIBLE = ("magic", "n_split", "blocks_per_split", "n_blocks", "eps", "rs_k", "rs_eps")  # small counts and the 0x4B000000 constant


def compile_gemv(fmt: str, bpp: int, warps: int, xmax: int = 0, slices: int = 1):
    """The compiled kernel (triton CompiledKernel) of `fmt` with BPP blocks per loop step, M = 1, no split-K;
    xmax > 0: the dp2a path with that x range and `slices` row slices."""
    spec = INT_SPECS[fmt]
    const = dict(BITS=spec.bits, OFF=spec.offset, GROUP=spec.group, EVEN_K=True, GATED=False,
                 PARTIAL=False, PDL=False, BPP=bpp, HAS_RES=False, XMAX=xmax, SLICES=slices, ASM=True, NORM=False,
                 SS=False, ZERO=False, SPLIT_MAX=0, RS=False, GX=False, UNROLL=1)
    sig = dict(_SIGNATURE, **{name: "constexpr" for name in const})
    attrs = {(int_gemv_kernel.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in _SIGNATURE if n not in _NOT_DIVISIBLE}
    src = ASTSource(fn=int_gemv_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})


def sass(kernel) -> str:
    tool = Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout


_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(?:\.[A-Z0-9_.]+)?\s*(.*?);")


def loops(text: str) -> list[list[str]]:
    """Opcodes of every loop (from the target of a backward BRA up to that branch), longest first."""
    lines = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_LINE.match, text.splitlines()) if m]
    found = []
    for addr, op, args in lines:
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            found.append([o for a, o, _ in lines if int(target.group(1), 16) <= a <= addr])
    return sorted(found, key=len, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the formats the integer kernel runs (8-bit codes stay row-major, read by the float kernels)
    ap.add_argument("--formats", default=",".join(f for f, s in INT_SPECS.items()
                                                  if not uses_row_major_layout(s) and not uses_fragment_layout(s)))
    ap.add_argument("--warps", type=int, default=0, help="default: 4, or the launcher's for --int-dot")
    ap.add_argument("--blocks", type=int, default=5, help="blocks of a program (K = 2560: 5); BPP of the no-min formats")
    ap.add_argument("--dump", type=Path, help="write each kernel's SASS here")
    ap.add_argument("--int-dot", type=int, default=0, metavar="SLICES",
                    help="the dp2a path with 1 or 4 row slices (warps: the launcher's, unless --warps is given)")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90, M = 1, one 16-row group per program"
          + (f", dp2a path with {args.int_dot} slices" if args.int_dot else ""))
    for fmt in args.formats.split(","):
        spec = INT_SPECS[fmt]
        bpp = args.blocks
        warps = args.warps
        xmax = int_dot_xmax(spec.bits, spec.offset, spec.group) if args.int_dot else 0
        if xmax:
            bpp = 1  # the dp2a loop steps one block at a time
            cfg = default_config("int", spec.bits, 2560, 2560, 1, torch.device("cpu"), group=spec.group)
            warps = warps or cfg.num_warps
        warps = warps or 4
        text = sass(compile_gemv(fmt, bpp, warps, xmax, args.int_dot or 1))
        body, *others = loops(text)
        codes = 16 * bpp * BLOCK_K / (32 * warps)  # codes per thread and loop step
        spills = len(re.findall(r"\b(?:STL|LDL)\b", text))
        top = collections.Counter(body).most_common(10)
        print(f"{fmt:5s} {warps}w loop {len(body):5d} instr / {codes:4.0f} codes = {len(body) / codes:5.2f} per code, "
              f"{spills} local-memory ops, other loops {[len(o) for o in others]};  "
              + ", ".join(f"{op} {n}" for op, n in top))
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"int_gemv_{fmt}.sass").write_text(text)


if __name__ == "__main__":
    main()
