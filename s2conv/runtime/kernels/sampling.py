"""One Triton kernel for the top-k / top-p / temperature filter and the exponential-race draw of `runtime.sampling`.

The eager filter sorts the whole row and runs about 18 small kernels per draw (sort, softmax, cumsum, scatter, ...);
a decode frame draws 11 or 12 times. Only the top_k highest logits can survive: for top_k <= 64 and rows of up to
8192 logits (S2's 4097 semantic columns, 4096 codes) the kernel picks them itself, otherwise torch.topk does. One
launch serves every row and every (temperature, top_p) pair (RAS's normal and "high" draws share it):

    noise = torch.empty(P, B, k).exponential_()              # one Exp(1) per candidate and draw, k = min(top_k, V)
    tokens = topk_sample(logits, None, None, noise, [(0.8, 0.8), (1.0, 0.9)], top_k=30)   # [P, B] columns
    vals, idx = torch.topk(logits, k); tokens = topk_sample(logits, vals, idx, noise, draws)   # any k, any V

Rounding follows the eager code where it rounds to the logits' dtype (softmax outputs, the tempered logits, the
cumulative sum's outputs); its sums run in fp32, so a draw can differ from the eager filter only when a cumulative
probability lies within one bf16 rounding of top_p (or among tied logits, which the kernel ranks by column).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from s2conv.errors import RuntimeModelError
from s2conv.runtime.kernels.fused import _fix, _round
from s2conv.runtime.kernels.common import pdl_start, pdl_wait
from s2conv.runtime.kernels.launch import early_pdl, launch_early

_BLOCK_V = 1024  # logits per step of the normalizer loop
MAX_DRAWS = 4  # (temperature, top_p) pairs per launch
SELECT_MAX_K = 64  # in-kernel candidate selection: at most this many rounds ...
SELECT_MAX_V = 8192  # ... over a row held in registers
_CAP = 128  # logits at or above the selection threshold that the kernel ranks at once
_WARPS: int | None = None  # warps per launch (None: 8 for rows over 1024 logits, else 4; scripts/probe_sampling.py)


@triton.jit
def _rank(val, col, n):
    """Each of the n entries' rank in (value descending, column ascending) order: [n] int32 (no two entries share a
    column, so the ranks are 0 .. n - 1)."""
    before = (val[None, :] > val[:, None]) | ((val[None, :] == val[:, None]) & (col[None, :] < col[:, None]))
    return tl.sum(before.to(tl.int32), axis=1)


@triton.jit
def _select_by_threshold(row, cols, V, K, r, scratch_v, scratch_i, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUPS: tl.constexpr, CAP: tl.constexpr):
    """(values [BLOCK_K], columns [BLOCK_K], ok) of the row's K highest logits, highest first and the lowest column
    first among equals; ok = 0 when more than CAP logits tie with or pass the threshold (the caller then falls back).

    The K-th highest of the row's GROUPS group maxima is a threshold no higher than the K-th highest logit (K
    groups reach it), so the logits at or above it hold the top K: they are packed through scratch memory into CAP
    slots and ranked all at once, where K rounds of a row-wide maximum took ~17 us on an H100."""
    gmax = tl.max(tl.reshape(row, [GROUPS, BLOCK_V // GROUPS]), axis=1)
    g = tl.arange(0, GROUPS)
    tau = tl.max(tl.where(_rank(gmax, g, GROUPS) == K - 1, gmax, float("-inf")), axis=0)
    cand = (row >= tau) & (cols < V)
    count = tl.sum(cand.to(tl.int32), axis=0)
    ok = count <= CAP
    slot = tl.cumsum(cand.to(tl.int32), axis=0) - 1
    packed = cand & (tl.zeros([BLOCK_V], tl.int32) + count <= CAP)  # tile-shaped masks (scalar ones are not portable)
    tl.store(scratch_v + slot, row, mask=packed)
    tl.store(scratch_i + slot, cols, mask=packed)
    tl.debug_barrier()  # the whole program's stores are visible to its loads below
    c = tl.arange(0, CAP)
    here = (c < count) & (tl.zeros([CAP], tl.int32) + count <= CAP)
    cv = tl.load(scratch_v + c, mask=here, other=float("-inf"))
    ci = tl.load(scratch_i + c, mask=here, other=0)
    ci = tl.where(here, ci, V + c)  # empty slots rank last, each at a column of its own
    hit = _rank(cv, ci, CAP)[None, :] == r[:, None]  # [BLOCK_K, CAP]: slot c holds the logit of rank r
    v = tl.sum(tl.where(hit, cv[None, :], 0.0), axis=1)
    idx = tl.sum(tl.where(hit, ci[None, :], 0), axis=1).to(tl.int64)
    return v, idx, ok


@triton.jit
def _topk_sample_kernel(l_ptr, v_ptr, i_ptr, e_ptr, out_ptr, sv_ptr, si_ptr, V, K, stride_l, stride_v, stride_i,
                        stride_eb, stride_ep, stride_o, t0, p0, t1, p1, t2, p2, t3, p3, d_ptr, t_ptr, x_ptr, D,
                        stride_t, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, SELECT: tl.constexpr,
                        FIX: tl.constexpr, GROUPS: tl.constexpr = 64, CAP: tl.constexpr = 128,
                        FROM_PTR: tl.constexpr = False, EMBED: tl.constexpr = False, BLOCK_D: tl.constexpr = 16,
                        PDL: tl.constexpr = 0):
    """Program (row b, draw d): the column index of row b's token under the d-th (temperature, top_p) pair.

    SELECT: the whole row fits one BLOCK_V tile and the kernel picks the K candidates itself
    (`_select_by_threshold`, scratch sv / si of CAP slots per program; where too many logits tie, K rounds of
    "take the maximum, lowest column first, and mask it out"); torch.topk's radix select costs ~20 us a row on an
    H100. Otherwise v_ptr / i_ptr hold torch.topk's output.
    FROM_PTR: the pair is read from d_ptr (fp32 [P, 2], as given) at run time and rounded here as the host rounds
    t0..p3 (temperature at least 1e-5, both to the logits' dtype), so a captured graph serves any values.
    EMBED: draw 0's program also copies row `token` of the table t_ptr (D wide) into row b of x_ptr, the next
    step's input, where a separate gather launch would follow.
    PDL 3 (`launch_early`): it starts while its predecessor runs, and waits before it reads anything (the values,
    the noise and the logits, from L2)."""
    pdl_start(PDL)
    pdl_wait(PDL)  # everything below may come from the launch just before: the values, the noise, the logits
    b = tl.program_id(0)
    d = tl.program_id(1)
    dtype = l_ptr.dtype.element_ty
    if FROM_PTR:
        t = _round(tl.maximum(tl.load(d_ptr + 2 * d, cache_modifier=".cg"), 1e-5), dtype, FIX).to(tl.float32)
        top_p = _round(tl.load(d_ptr + 2 * d + 1, cache_modifier=".cg"), dtype, FIX).to(tl.float32)
    else:
        t = tl.where(d == 0, t0, tl.where(d == 1, t1, tl.where(d == 2, t2, t3)))
        top_p = tl.where(d == 0, p0, tl.where(d == 1, p1, tl.where(d == 2, p2, p3)))
    r = tl.arange(0, BLOCK_K)
    live = r < K
    noise = tl.load(e_ptr + d * stride_ep + b * stride_eb + r, mask=live, other=1.0, cache_modifier=".cg")
    if SELECT:
        cols = tl.arange(0, BLOCK_V)
        row = tl.load(l_ptr + b * stride_l + cols, mask=cols < V, other=float("-inf"),
                      cache_modifier=".cg").to(tl.float32)
        top = tl.max(row, axis=0)
        norm = tl.sum(tl.exp(row - top), axis=0)
        slots = (b * tl.num_programs(1) + d) * CAP
        # half the slots first: ranking costs CAP**2 comparisons, and S2's rows (4096 codes, 64 groups) have about
        # 45 logits at the threshold (iid logits: 4096 * (1 - 2**(-1/64))), over 64 at 3 standard deviations;
        # an H200 drew in 7.0 us with 64 slots against 9.2 us with 128 (scripts/probe_sampling.py)
        FIRST: tl.constexpr = CAP // 2 if CAP // 2 >= BLOCK_K else CAP
        v, idx, ok = _select_by_threshold(row, cols, V, K, r, sv_ptr + slots, si_ptr + slots, BLOCK_V, BLOCK_K,
                                          GROUPS, FIRST)
        if FIRST < CAP:
            if not ok:
                v, idx, ok = _select_by_threshold(row, cols, V, K, r, sv_ptr + slots, si_ptr + slots, BLOCK_V,
                                                  BLOCK_K, GROUPS, CAP)
        if not ok:
            v = tl.full([BLOCK_K], float("-inf"), tl.float32)
            idx = tl.zeros([BLOCK_K], tl.int64)
            rest = row
            for j in range(0, K):
                best, at = tl.max(rest, axis=0, return_indices=True, return_indices_tie_break_left=True)
                v = tl.where(r == j, best, v)
                idx = tl.where(r == j, at.to(tl.int64), idx)
                rest = tl.where(cols == at, float("-inf"), rest)
        v = tl.where(live, v, float("-inf"))
    else:
        v = tl.load(v_ptr + b * stride_v + r, mask=live, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
        idx = tl.load(i_ptr + b * stride_i + r, mask=live, other=0, cache_modifier=".cg")
        top = tl.max(v, axis=0)  # = v[0]: topk returns the row maximum first
        # softmax normalizer of the untempered row (eager: softmax over all V sorted logits)
        total = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            lv = tl.load(l_ptr + b * stride_l + cols, mask=cols < V, other=float("-inf"),
                         cache_modifier=".cg").to(tl.float32)
            total += tl.exp(lv - top)
        norm = tl.sum(total, axis=0)
    p = _round(tl.exp(v - top) / norm, dtype, FIX).to(tl.float32)  # eager: softmax in the logits' dtype
    cum = _round(tl.cumsum(p, axis=0), dtype, FIX).to(tl.float32)
    keep = live & ((cum <= top_p) | (r == 0))  # rank >= top_k is already outside the K candidates
    # tempered softmax over the kept candidates, in the logits' dtype, then the race: argmax(prob / Exp(1))
    z = _round(v / t, dtype, FIX).to(tl.float32)
    z = tl.where(keep, z, float("-inf"))
    ez = tl.exp(z - tl.max(z, axis=0))
    prob = _round(ez / tl.sum(ez, axis=0), dtype, FIX).to(tl.float32)
    score = tl.where(keep, prob / noise, -1.0)
    pick = tl.argmax(score, axis=0)
    token = tl.sum(tl.where(r == pick, idx, 0), axis=0)
    tl.store(out_ptr + d * stride_o + b, token)
    if EMBED:
        if d == 0:
            for start in range(0, D, BLOCK_D):
                c = start + tl.arange(0, BLOCK_D)
                tl.store(x_ptr + b * D + c, tl.load(t_ptr + token * stride_t + c, mask=c < D), mask=c < D)


def _fail(what: str, expected: str, got) -> RuntimeModelError:
    return RuntimeModelError(f"topk_sample: {what} must be {expected}, got {got}")


def select_in_kernel(v: int, k: int) -> bool:
    """Whether `topk_sample` picks the candidates itself (then vals / idx may be None): small k, rows of <= 8192."""
    return k <= SELECT_MAX_K and v <= SELECT_MAX_V


def topk_sample(logits: torch.Tensor, vals: torch.Tensor | None, idx: torch.Tensor | None, noise: torch.Tensor,
                draws: list[tuple[float, float]] | torch.Tensor, top_k: int | None = None,
                table: torch.Tensor | None = None):
    """Column indices [P, B] (int64) of one token per row and draw; with a table [>= V, D] (contiguous rows, on
    the logits' device) also its rows of draw 0's tokens, [B, D] in the table's dtype: (tokens, rows).

    logits [B, V] (bf16, fp16 or fp32; contiguous rows); k = min(top_k, V) candidates: vals, idx [B, k] from
    torch.topk(logits, k) (sorted), or None where `select_in_kernel(V, k)` (then top_k is required); noise fp32
    [P, B, k] of Exp(1) draws; draws: P <= 4 pairs (temperature > 0, top_p), each already rounded to the logits'
    dtype as the eager filter rounds them, or an fp32 [P, 2] tensor on the logits' device holding them unrounded,
    read by the kernel when it runs (a CUDA graph captured with it follows later values). No host synchronisation
    (CUDA-graph safe).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise _fail("logits", "2-D [B, V] with contiguous rows", f"{tuple(logits.shape)} {logits.stride()}")
    bsz, v = logits.shape
    select = vals is None
    if select:
        if top_k is None or top_k < 1 or not select_in_kernel(v, min(top_k, v)):
            raise _fail("top_k", f"1..{SELECT_MAX_K} with V <= {SELECT_MAX_V} when vals / idx are None",
                        f"top_k {top_k}, V {v}")
        k = min(top_k, v)
        vals = idx = noise  # unused pointers
    else:
        k = vals.shape[-1]
        if vals.shape != (bsz, k) or idx.shape != (bsz, k) or vals.stride(1) != 1 or idx.stride(1) != 1 or k > v:
            raise _fail("vals / idx", f"[{bsz}, k <= {v}] from torch.topk",
                        f"{tuple(vals.shape)} {tuple(idx.shape)}")
    from_ptr = isinstance(draws, torch.Tensor)
    if not 1 <= len(draws) <= MAX_DRAWS:
        raise _fail("draws", f"1 to {MAX_DRAWS} (temperature, top_p) pairs", len(draws))
    if from_ptr and (draws.dim() != 2 or draws.shape[1] != 2 or draws.dtype != torch.float32
                     or draws.device != logits.device or not draws.is_contiguous()):
        raise _fail("draws", f"a contiguous fp32 [P, 2] tensor on {logits.device}",
                    f"{draws.dtype} {tuple(draws.shape)} on {draws.device}")
    if noise.shape != (len(draws), bsz, k) or noise.dtype != torch.float32 or noise.stride(2) != 1:
        raise _fail("noise", f"fp32 [{len(draws)}, {bsz}, {k}]", f"{noise.dtype} {tuple(noise.shape)}")
    if table is not None and (table.dim() != 2 or table.shape[0] < v or table.stride(1) != 1
                              or table.device != logits.device):
        raise _fail("table", f"[>= {v}, D] with contiguous rows on {logits.device}",
                    f"{tuple(table.shape)} {table.stride()} on {table.device}")
    out = torch.empty(len(draws), bsz, dtype=torch.int64, device=logits.device)
    rows = None if table is None else torch.empty(bsz, table.shape[1], dtype=table.dtype, device=logits.device)
    pairs = [1.0, 1.0] * MAX_DRAWS if from_ptr else (
        [float(x) for pair in draws for x in pair] + [1.0, 1.0] * (MAX_DRAWS - len(draws)))
    block_k = max(16, triton.next_power_of_2(k))
    block_v = max(16, triton.next_power_of_2(v)) if select else _BLOCK_V
    # candidate selection: groups of 64 logits, at least 64 groups (k <= 64 of them reach the threshold)
    groups = max(min(64, block_v), block_v // 64)
    cap = min(_CAP, block_v)  # a row of at most 128 logits: all of them fit the slots
    slots = cap * bsz * len(draws) if select else 1
    scratch_v = torch.empty(slots, dtype=torch.float32, device=logits.device)
    scratch_i = torch.empty(slots, dtype=torch.int32, device=logits.device)
    launch_early(
        _topk_sample_kernel, (bsz, len(draws)),
        logits, vals, idx, noise, out, scratch_v, scratch_i, v, k, logits.stride(0), vals.stride(0), idx.stride(0),
        noise.stride(1), noise.stride(0), out.stride(0), *pairs, draws if from_ptr else noise,
        out if table is None else table, out if rows is None else rows, 0 if table is None else table.shape[1],
        0 if table is None else table.stride(0), BLOCK_K=block_k, BLOCK_V=block_v, SELECT=select,
        FIX=_fix(logits.dtype), GROUPS=groups, CAP=cap, FROM_PTR=from_ptr, EMBED=table is not None,
        BLOCK_D=1024 if table is None else min(1024, max(16, triton.next_power_of_2(table.shape[1]))),
        num_warps=_WARPS or (8 if max(block_k, block_v) > 1024 else 4),
        outputs=(out,) if rows is None else (out, rows), **early_pdl(logits.device, "S2CONV_EARLY_SMALL"))
    return out if table is None else (out, rows)
