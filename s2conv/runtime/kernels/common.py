"""Pieces every decode kernel shares: the PDL prologue (launch.py) and the output store with a folded residual add."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one's writes (launch.py); no-op without PDL."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def store_output(ptrs, y, mask, r_ptrs, HAS_RES: tl.constexpr):
    """Store fp32 y in the output's dtype. HAS_RES: store residual + y the way eager `h + linear(x)` computes it:
    y rounded to the output dtype first, the sum in fp32, rounded again (one kernel instead of a GEMV and an add)."""
    out = y.to(ptrs.dtype.element_ty)
    if HAS_RES:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + r).to(ptrs.dtype.element_ty)
    tl.store(ptrs, out, mask=mask)
