"""Pieces every decode kernel shares: the PDL prologue (launch.py), the output store with a folded residual add and
the in-launch split-K finish of the GEMVs."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """PDL 1: let the next kernel launch, then wait for the previous one's writes (launch.py); 2: only let the next
    kernel launch (this one was launched plainly; a CUDA GEMV after it may start early); 3: only let the next kernel
    launch, and wait later, at `pdl_wait` (`launch.launch_early`); 0: nothing."""
    if PDL == 1:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL == 2 or PDL == 3:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """PDL 3: wait here for the previous kernel's writes (a no-op when the launch did not ask for PDL)."""
    if PDL == 3:
        gdc_wait()


@triton.jit
def round_to(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 x -> dtype with round-to-nearest-even (FIX_BF16: by integer arithmetic, for triton's CPU interpreter,
    which truncates fp32 -> bf16; on GPUs the hardware conversion already rounds to nearest-even)."""
    if FIX_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def store_output(ptrs, y, mask, r_ptrs, HAS_RES: tl.constexpr, ss_ptr=None, SS: tl.constexpr = False,
                 g_ptrs=None, gx_ptrs=None, GX: tl.constexpr = False):
    """Store fp32 y in the output's dtype. HAS_RES: store residual + y the way eager `h + linear(x)` computes it:
    y rounded to the output dtype first, the sum in fp32, rounded again (one kernel instead of a GEMV and an add).
    SS: also add the sum of squares of the stored values to ss_ptr[0] (fp32, atomically: every program of the
    row adds its part), the statistic of the RMSNorm that the next GEMV applies to this output (`norm_scale`).
    GX: also store the output times the next RMSNorm's weight (g_ptrs: its elements at the output's columns),
    rounded, to gx_ptrs: what an integer GEMV reads as x when it applies that norm's rsqrt to its own output."""
    out = y.to(ptrs.dtype.element_ty)
    if HAS_RES:
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + r).to(ptrs.dtype.element_ty)
    tl.store(ptrs, out, mask=mask)
    if GX:
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx_ptrs, (out.to(tl.float32) * g).to(gx_ptrs.dtype.element_ty), mask=mask)
    if SS:
        o = tl.ravel(tl.where(mask, out.to(tl.float32), 0.0))  # (any tile shape)
        tl.atomic_add(ss_ptr, tl.sum(o * o, axis=0), sem="relaxed")


@triton.jit
def rs_scale(ss, K, eps):
    """rsqrt(ss / K + eps): the RMSNorm factor of a row with sum of squares ss (loaded early by the caller, so
    that its round trip overlaps the weight loads; the integer GEMVs apply it to their output, see GX)."""
    return 1.0 / tl.sqrt_rn(ss / K + eps)


@triton.jit
def norm_scale(ss_ptr, K, eps):
    """rsqrt(mean(x**2) + eps) of a row whose sum of squares a producer's `store_output(.., SS=True)` left in
    ss_ptr[0]: an RMSNorm's per-row factor without a pass over the row."""
    return rs_scale(tl.load(ss_ptr), K, eps)


@triton.jit
def zero_once(ptr, ZERO: tl.constexpr):
    """ptr[0] = 0 from the grid's first program (ZERO): a consumed sum-of-squares slot, reset for the next step."""
    if ZERO:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            tl.store(ptr, 0.0)


@triton.jit
def finish_split(y, y3, offs_n, n_mask, p_row, pid_k, stride_ps, N, c_ptr, n_split, out_ptrs, r_ptrs,
                 GATED: tl.constexpr, HAS_RES: tl.constexpr, ss_ptr=None,
                 SS: tl.constexpr = False, SPLIT_MAX: tl.constexpr = 0, g_ptrs=None, gx_ptrs=None,
                 GX: tl.constexpr = False):
    """Split-K finished inside the launch: store this program's fp32 partial sums y (and y3, gated: w3's,
    at column N + n) to p_row[pid_k * stride_ps + n], then count the arrival in c_ptr (an int32 counter, zero
    before the launch); the program that arrives last for this row tile sums the n_split partials, applies the
    gate (silu(y) * y3) and stores the output (+ residual, `store_output`), then sets the counter back to 0 for
    the next launch. Launches sharing a counter must therefore not run concurrently. One launch fewer than a
    separate reduction kernel. SS, GX: as in `store_output`. y, offs_n and n_mask may have any one tile shape.
    SPLIT_MAX >= n_split (a power of two, `split_max`): the partials' loads are unrolled, all in flight at once
    (a loop over a runtime count issued them four at a time: one L2 round trip per four splits); 0: that loop."""
    tl.store(p_row + pid_k * stride_ps + offs_n, y, mask=n_mask)
    if GATED:
        tl.store(p_row + pid_k * stride_ps + N + offs_n, y3, mask=n_mask)
    tl.debug_barrier()  # every thread's partials are written before the count (release) below
    arrived = tl.atomic_add(c_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == n_split - 1:  # the last program of this row tile: reduce (".cg": read from L2, not L1)
        acc = tl.zeros_like(y)
        acc3 = tl.zeros_like(y)
        if SPLIT_MAX > 0:
            for s in tl.static_range(SPLIT_MAX):
                live = n_mask & (offs_n * 0 + s < n_split)  # (a tensor compare: a scalar bool mask is not portable)
                acc += tl.load(p_row + s * stride_ps + offs_n, mask=live, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc3 += tl.load(p_row + s * stride_ps + N + offs_n, mask=live, other=0.0, cache_modifier=".cg")
        else:
            for s in range(n_split):
                acc += tl.load(p_row + s * stride_ps + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc3 += tl.load(p_row + s * stride_ps + N + offs_n, mask=n_mask, other=0.0,
                                    cache_modifier=".cg")
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc3
        store_output(out_ptrs, acc, n_mask, r_ptrs, HAS_RES, ss_ptr, SS, g_ptrs, gx_ptrs, GX)
        tl.store(c_ptr, 0)
