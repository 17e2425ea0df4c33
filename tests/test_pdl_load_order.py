"""The CUDA GEMVs request their weights before the PDL wait, in the machine code (on the CPU, with nvcc and triton's
bundled cuobjdump): every load of weight words and scales (ld.global.nc, SASS LDG...CONSTANT; the words'
LDG.E.NA) comes before ACQBULK (griddepcontrol.wait), every load of x and the residual (ld.global.cg,
LDG...STRONG.GPU) after it. Without the ordering asm in `cuda_common.pdl_wait` (S2CONV_PDL_FENCE=0), ptxas
schedules the wait above all of them (q4 frames 6.1% slower on an H100). (nvcc's ptxas stands in for the NVRTC
that compiles the kernels at run time.)"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from s2conv.runtime.kernels import cuda_frag, cuda_int, cuda_rows

_FORMATS = {"q4": (cuda_int, dict(bits=4, group=128, offset=8, norm=True)),
            "q4_0": (cuda_int, dict(bits=4, group=32, offset=8, half_scales=True, norm=True)),
            "q3": (cuda_int, dict(bits=3, group=128, offset=4, norm=True)),
            "q2": (cuda_int, dict(bits=2, group=64, offset=2, norm=True)),
            "tq2_0": (cuda_int, dict(bits=2, group=256, offset=2)), "q4_k": (cuda_frag, dict(bits=4, group=32)),
            "q3_k": (cuda_frag, dict(bits=3, group=16)), "q2_k": (cuda_frag, dict(bits=2, group=16)),
            "fp8": (cuda_rows, dict(fp8=True, norm=True)), "q8": (cuda_rows, dict(fp8=False, norm=True))}
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def _cuobjdump() -> str | None:
    try:
        import triton.backends.nvidia as nvidia_backend
    except ImportError:
        return None
    tool = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")
    return tool if os.path.exists(tool) else None


@pytest.mark.skipif(shutil.which("nvcc") is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("fmt", list(_FORMATS))
@pytest.mark.parametrize("gated", [False, True])
def test_weight_loads_go_out_before_the_pdl_wait(tmp_path, monkeypatch, fmt, gated):
    monkeypatch.delenv("S2CONV_PDL_FENCE", raising=False)  # the default
    module, kw = _FORMATS[fmt]
    v = module.Variant(5, **kw, gated=gated, has_res=True, pdl=True, min_blocks=module.min_blocks(gated, 5))
    src, cubin = tmp_path / "k.cu", tmp_path / "k.cubin"
    src.write_text(v.source())
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", str(src), "-o", str(cubin)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True).stdout
    ops = [m.group(1) for m in _OPCODE.finditer(sass)]
    assert ops.count("ACQBULK") == 1, "no PDL wait (ACQBULK) in the SASS, or several"
    wait = ops.index("ACQBULK")
    weights = [i for i, op in enumerate(ops) if op.startswith("LDG.E.NA")]
    constants = [i for i, op in enumerate(ops) if op.startswith("LDG") and "CONSTANT" in op]  # weights and scales
    fresh = [i for i, op in enumerate(ops) if op.startswith("LDG") and "STRONG.GPU" in op]
    # a lane's weight words, 16-byte loads: 2 bits a half (interleaved layouts), 8 (row-major 8-bit codes: a row each)
    assert len(weights) >= (8 if module is cuda_rows else 2 * v.bits) * (2 if gated else 1)
    assert len(constants) > len(weights)  # the scales too
    late = sum(i > wait for i in constants)
    assert late == 0, f"{late} of {len(constants)} weight and scale loads after the wait"
    assert fresh and min(fresh) > wait  # x and the residual only after it
