"""Fused Triton kernels for the decode step: RMSNorm (+ residual add), QK-norm + RoPE + KV-cache write,
split-K decode attention (a program per query head, or per KV head past `ATTN_GQA_SPAN` keys) and SwiGLU's
silu(a) * b. Each replaces a chain of small eager ops by one launch.
Batched decoding of left-padded rows passes per-row RoPE table rows and per-row first keys (the pad offsets).

The rounding points follow the eager code in `s2conv.runtime.layers` / `rope.py` step by step (fp32 math, a round to
the activation dtype wherever eager rounds), so results match eager bit for bit or within one ulp of summation order.
Positions come from 1-element device tensors: no host sync, safe inside CUDA graphs.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from s2conv.errors import RuntimeModelError
from s2conv.runtime.kernels.common import pdl_start, pdl_wait, round_to as _round
from s2conv.runtime.kernels.launch import counters, early_pdl, launch, launch_early, pdl_args

# triton's CPU interpreter rounds fp32 -> bf16 by truncation; the kernels then round to nearest-even by hand so the
# interpreter matches torch (on GPUs the hardware conversion already does)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ATTN_BLOCK_N = 64  # keys per attention loop step (fewer, down to 16, where the span is shorter: the fast AR's)
ATTN_WARPS = None  # warps per attention program; None: one per 32 keys of a step
ATTN_REDUCE_WARPS = 1  # warps per program of the split reduction (H100: 0.2-0.3 us a launch faster than 4)
# one program per KV head (`_decode_attn_gqa_kernel`: bf16 / fp16 caches, 2+ query heads per KV head) for spans of
# more than this many keys: it reads each key once instead of once per query head, but its dots cost more than
# they save on short spans (H100, S2's slow AR, us a launch, per query head / per KV head: 512 keys 6.5 / 7.4,
# 1024 keys 7.6 / 7.9, 1536 keys 12.6 / 9.1, 4096 keys 23.8 / 12.0; the fast AR's 10 keys 2.2 / 3.5;
# bench/RESULTS.md). S2CONV_ATTN_GQA_SPAN overrides it (0: always). Then its keys per step, warps, programs per SM
# and splits per KV head at most (the merge loads [heads, splits, D] at once)
ATTN_GQA_SPAN = int(os.environ.get("S2CONV_ATTN_GQA_SPAN", "1024"))
ATTN_GQA_BLOCK_N = 64
ATTN_GQA_WARPS = 4
ATTN_GQA_PER_SM = 2
ATTN_GQA_MAX_SPLITS = 16


def _fix(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _fail(op: str, what: str, expected: str, got) -> RuntimeModelError:
    return RuntimeModelError(f"{op}: {what} must be {expected}, got {got}")


def _rows(op: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """t [..., n] as a 2-D [rows, n] view (a copy only when the last axis is strided)."""
    if t.shape[-1] != n:
        raise _fail(op, "last dimension", str(n), tuple(t.shape))
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: any valid grid will do


# ---- RMSNorm -----------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, N, stride_x, stride_r, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, FIX_X: tl.constexpr, FIX_Y: tl.constexpr,
                     PDL: tl.constexpr):
    """One row: [h = x + r (rounded to x's dtype, stored)]; y = round(round(h * rsqrt(mean(h^2) + eps)) * w).
    PDL 3 (`launch_early`): the weight is requested before the wait, x and r after it, from L2."""
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0, cache_modifier=".cg")
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0, cache_modifier=".cg")
        x = _round(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty, FIX_X)
        tl.store(h_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = _round(xf * inv, x_ptr.dtype.element_ty, FIX_X).to(tl.float32)
    tl.store(y_ptr + row * N + offs, _round(normed * w, y_ptr.dtype.element_ty, FIX_Y), mask=mask)


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    op = "rms_norm"
    n = x.shape[-1]
    if weight.shape != (n,):
        raise _fail(op, "weight shape", f"({n},)", tuple(weight.shape))
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise _fail(op, "residual", f"{tuple(x.shape)} {x.dtype} like x", f"{tuple(residual.shape)} {residual.dtype}")
    x2 = _rows(op, x, n)
    r2 = _rows(op, residual, n) if residual is not None else x2
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x2
    # eager: normed.type_as(x) * weight -> the product takes the promoted dtype (x's in the model)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    launch_early(_rms_norm_kernel, (x2.shape[0],),
                 x2, r2, weight, h, y, n, x2.stride(0), r2.stride(0), float(eps), HAS_RES=residual is not None,
                 BLOCK=block, FIX_X=_fix(x.dtype), FIX_Y=_fix(y.dtype), num_warps=8 if block >= 2048 else 4,
                 outputs=(y, h) if residual is not None else (y,), **early_pdl(x.device, "S2CONV_EARLY_SMALL"))
    return h, y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fish-speech RMSNorm of x [..., N] with weight [N]: normalise in fp32, round to x's dtype, multiply by the
    weight and round again (to the promoted dtype of x and weight, x's dtype in the model). One kernel."""
    return _norm_launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) for h = x + residual rounded to x's dtype (the pre-norm block's residual add). One kernel."""
    return _norm_launch(x, residual, weight, eps)


# ---- QK-norm + RoPE + KV-cache write ---------------------------------------------------------------------------------
@triton.jit
def _qk_rope_cache_kernel(qkv_ptr, qw_ptr, kw_ptr, f_ptr, kc_ptr, vc_ptr, q_ptr, pos_ptr,
                          H, HKV, stride_qkv, stride_f, stride_cb, stride_ch, eps,
                          HAS_NORM: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr, FIX: tl.constexpr,
                          PDL: tl.constexpr, PROMPT: tl.constexpr = False):
    """Program (b, tile of HEADS heads) over the H + 2 HKV heads of one qkv row, as [HEADS, D/2] pairs (2j, 2j+1).

    Query and key heads: optional per-head RMSNorm (fp32, scaled, rounded once), then the pair rotation in fp32,
    rounded; queries go to q [B, H, 1, D], keys to the k cache at position pos. Value heads pass through the same
    arithmetic with cos = 1, sin = 0 (exact) into the v cache. Row b's (cos, sin) pairs start at f + b * stride_f
    (stride_f 0: one table row shared by all rows). PROMPT: the rows are the positions of one sequence (prefill):
    row b goes to position pos[b] of cache row 0."""
    pdl_start(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    j = tl.arange(0, D // 2)
    if PROMPT:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        cache_row = 0
    else:
        pos = tl.load(pos_ptr).to(tl.int64)
        cache_row = b
    live = head < H + 2 * HKV
    is_q = head < H
    is_v = live & (head >= H + HKV)  # not the padding heads of the last tile: they would write past the cache
    is_k = live & ~is_q & ~is_v
    src = qkv_ptr + b * stride_qkv + head[:, None] * D + 2 * j[None, :]
    x0 = tl.load(src, mask=live[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=live[:, None], other=0.0).to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    if HAS_NORM:
        inv = 1.0 / tl.sqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)
        qw0 = tl.load(qw_ptr + 2 * j).to(tl.float32)
        qw1 = tl.load(qw_ptr + 2 * j + 1).to(tl.float32)
        kw0 = tl.load(kw_ptr + 2 * j).to(tl.float32)
        kw1 = tl.load(kw_ptr + 2 * j + 1).to(tl.float32)
        w0 = tl.where(is_q[:, None], qw0[None, :], kw0[None, :])
        w1 = tl.where(is_q[:, None], qw1[None, :], kw1[None, :])
        n0 = _round((x0 * inv[:, None]) * w0, dtype, FIX).to(tl.float32)
        n1 = _round((x1 * inv[:, None]) * w1, dtype, FIX).to(tl.float32)
        x0 = tl.where(is_v[:, None], x0, n0)
        x1 = tl.where(is_v[:, None], x1, n1)
    f_row = f_ptr + b * stride_f
    cos = tl.where(is_v[:, None], 1.0, tl.load(f_row + 2 * j).to(tl.float32)[None, :])
    sin = tl.where(is_v[:, None], 0.0, tl.load(f_row + 2 * j + 1).to(tl.float32)[None, :])
    re = _round(x0 * cos - x1 * sin, dtype, FIX)
    im = _round(x1 * cos + x0 * sin, dtype, FIX)
    q_dst = q_ptr + (b * H + head[:, None]) * D + 2 * j[None, :]
    kv_head = tl.where(is_v, head - H - HKV, head - H).to(tl.int64)
    kv_off = cache_row * stride_cb + kv_head[:, None] * stride_ch + pos * D + 2 * j[None, :]
    tl.store(q_dst, re, mask=is_q[:, None])
    tl.store(q_dst + 1, im, mask=is_q[:, None])
    tl.store(kc_ptr + kv_off, re, mask=is_k[:, None])
    tl.store(kc_ptr + kv_off + 1, im, mask=is_k[:, None])
    tl.store(vc_ptr + kv_off, re, mask=is_v[:, None])
    tl.store(vc_ptr + kv_off + 1, im, mask=is_v[:, None])


def _pos_tensor(pos, device: torch.device) -> torch.Tensor:
    if isinstance(pos, torch.Tensor):
        if pos.numel() != 1:
            raise _fail("fused decode", "pos", "a 1-element tensor (S = 1 decode)", tuple(pos.shape))
        return pos.reshape(1)
    return torch.tensor([int(pos)], device=device)


def _check_cache(op: str, name: str, cache: torch.Tensor, batch: int, n_kv: int, d: int, dtype) -> None:
    if cache.dim() != 4 or cache.shape[0] < batch or cache.shape[1] != n_kv or cache.shape[3] != d:
        raise _fail(op, name, f"[>= {batch}, {n_kv}, max_seq, {d}]", tuple(cache.shape))
    if cache.dtype != dtype or cache.stride(3) != 1 or cache.stride(2) != d:
        raise _fail(op, name, f"{dtype} with contiguous [max_seq, {d}] planes", f"{cache.dtype} {cache.stride()}")


def _check_qkv(op: str, qkv: torch.Tensor, q_norm_w, k_norm_w, freqs_cis_row: torch.Tensor, n_head: int,
               n_kv_head: int) -> tuple[int, torch.Tensor]:
    """Check one decode step's qkv [B, 1, (H + 2 Hkv) * D], the norm weights and the RoPE rows; -> (D, the RoPE
    rows as [1 or B, D])."""
    b, width = qkv.shape[0], qkv.shape[-1]
    if width % (n_head + 2 * n_kv_head):
        raise _fail(op, "qkv width", f"a multiple of {n_head + 2 * n_kv_head} heads", width)
    d = width // (n_head + 2 * n_kv_head)
    if qkv.numel() != b * width:
        raise _fail(op, "qkv", f"[B, 1, {width}] (one position)", tuple(qkv.shape))
    if d % 2 or d & (d - 1):
        raise _fail(op, "head_dim", "an even power of two", d)
    if freqs_cis_row.numel() not in (d, b * d):
        raise _fail(op, "freqs_cis_row", f"[1, {d // 2}, 2] or [{b}, 1, {d // 2}, 2]", tuple(freqs_cis_row.shape))
    if (q_norm_w is None) != (k_norm_w is None):
        raise _fail(op, "q_norm_w and k_norm_w", "both given or both None", (q_norm_w is None, k_norm_w is None))
    return d, freqs_cis_row.reshape(-1, d).contiguous()


def qk_norm_rope_cache(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                       freqs_cis_row: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos,
                       n_head: int, n_kv_head: int, eps: float = 1e-6) -> torch.Tensor:
    """Split one decode step's fused projection qkv [B, 1, (H + 2 Hkv) * D] (q | k | v, head-major) into heads.

    Applies the per-head QK RMSNorm when q_norm_w / k_norm_w [D] are given, the interleaved-pair RoPE with
    freqs_cis_row [1, D/2, 2] ((cos, sin), any float dtype; or [B, 1, D/2, 2]: one table row per batch row, e.g.
    `freqs_cis[pos - pad_offsets]` of left-padded rows), writes k and v into k_cache / v_cache [B, Hkv, max_seq, D]
    at position pos (a 1-element device tensor or an int, shared by all rows) and returns q [B, H, 1, D].
    """
    op = "qk_norm_rope_cache"
    b, width = qkv.shape[0], qkv.shape[-1]
    d, freqs = _check_qkv(op, qkv, q_norm_w, k_norm_w, freqs_cis_row, n_head, n_kv_head)
    has_norm = q_norm_w is not None
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache(op, name, cache, b, n_kv_head, d, qkv.dtype)
    q2 = _rows(op, qkv, width)
    q = torch.empty(b, n_head, 1, d, dtype=qkv.dtype, device=qkv.device)
    stride_f = d if freqs.shape[0] > 1 else 0
    qw = q_norm_w if has_norm else freqs
    kw = k_norm_w if has_norm else freqs
    n_heads = n_head + 2 * n_kv_head
    # GPUs: a few heads per program; the interpreter: one program (its cost is per program, not per element)
    heads = triton.next_power_of_2(n_heads) if _INTERPRETED else 8
    launch(_qk_rope_cache_kernel, (b, triton.cdiv(n_heads, heads)),
           q2, qw, kw, freqs, k_cache, v_cache, q, _pos_tensor(pos, qkv.device), n_head, n_kv_head, q2.stride(0),
           stride_f, k_cache.stride(0), k_cache.stride(1), float(eps),
           HAS_NORM=has_norm, D=d, HEADS=heads, FIX=_fix(qkv.dtype),
           num_warps=4, outputs=(q,), **pdl_args(qkv.device))
    return q


def qk_norm_rope_cache_prompt(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                              freqs_cis: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              positions: torch.Tensor, n_head: int, n_kv_head: int, eps: float = 1e-6) -> torch.Tensor:
    """`qk_norm_rope_cache` for the S rows of one prompt (prefill): qkv [S, (H + 2 Hkv) * D], freqs_cis [S, D/2, 2]
    (row s: position positions[s]), caches [>= 1, Hkv, max_seq, D] (row 0 is written) -> q [S, H, D]. One launch
    for what the eager attention does in about 30 (two QK-norms, two RoPEs, the cache writes)."""
    op = "qk_norm_rope_cache_prompt"
    s, width = qkv.shape[0], qkv.shape[-1]
    if qkv.dim() != 2 or positions.shape != (s,) or positions.dtype.is_floating_point:
        raise _fail(op, "qkv and positions", "[S, width] and S integer positions",
                    f"{tuple(qkv.shape)} and {tuple(positions.shape)} {positions.dtype}")
    d, freqs = _check_qkv(op, qkv[:, None], q_norm_w, k_norm_w, freqs_cis, n_head, n_kv_head)
    if freqs.shape[0] != s:
        raise _fail(op, "freqs_cis", f"[{s}, {d // 2}, 2]: one RoPE row per prompt row", tuple(freqs_cis.shape))
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache(op, name, cache, 1, n_kv_head, d, qkv.dtype)
    q2 = _rows(op, qkv, width)
    q = torch.empty(s, n_head, d, dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm_w is not None
    n_heads = n_head + 2 * n_kv_head
    heads = triton.next_power_of_2(n_heads) if _INTERPRETED else 8
    launch(_qk_rope_cache_kernel, (s, triton.cdiv(n_heads, heads)),
           q2, q_norm_w if has_norm else freqs, k_norm_w if has_norm else freqs, freqs, k_cache, v_cache, q,
           positions, n_head, n_kv_head, q2.stride(0), d, k_cache.stride(0), k_cache.stride(1), float(eps),
           HAS_NORM=has_norm, D=d, HEADS=heads, FIX=_fix(qkv.dtype), num_warps=4, outputs=(q,),
           PROMPT=True, **pdl_args(qkv.device))
    return q


# ---- decode attention --------------------------------------------------------------------------------------------
@triton.jit
def _rope_head(row_ptr, w_ptr, f_row, eps, D: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
               dtype: tl.constexpr, FIX: tl.constexpr):
    """One head of a qkv row as `_qk_rope_cache_kernel` computes it (RMSNorm, pair rotation, each rounded to
    dtype), in natural order: fp32 [D]."""
    j = tl.arange(0, D // 2)
    x0 = tl.load(row_ptr + 2 * j, cache_modifier=".cg").to(tl.float32)  # from L2: the predecessor's output (PDL)
    x1 = tl.load(row_ptr + 2 * j + 1, cache_modifier=".cg").to(tl.float32)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(x0 * x0 + x1 * x1, axis=0) / D + eps)
        x0 = _round((x0 * inv) * tl.load(w_ptr + 2 * j).to(tl.float32), dtype, FIX).to(tl.float32)
        x1 = _round((x1 * inv) * tl.load(w_ptr + 2 * j + 1).to(tl.float32), dtype, FIX).to(tl.float32)
    if ROPE:
        cos = tl.load(f_row + 2 * j).to(tl.float32)
        sin = tl.load(f_row + 2 * j + 1).to(tl.float32)
        re = _round(x0 * cos - x1 * sin, dtype, FIX).to(tl.float32)
        im = _round(x1 * cos + x0 * sin, dtype, FIX).to(tl.float32)
        return tl.interleave(re, im)
    return tl.interleave(x0, x1)


@triton.jit
def _key_range(pos, split, keys_per_split, n_keys, off_ptr, b, HAS_OFFSETS: tl.constexpr, FUSED: tl.constexpr):
    """(start, end, cached end) of a split's keys: its share of the span, up to key pos; with HAS_OFFSETS from
    row b's first key (its left padding; a padded query, pos < offset, reads key pos alone); FUSED: the cached
    keys end before pos, whose key and value come from the projection in registers."""
    start = split * keys_per_split
    end = tl.minimum(tl.minimum(start + keys_per_split, pos + 1), n_keys)
    if HAS_OFFSETS:
        start = tl.maximum(start, tl.minimum(tl.load(off_ptr + b).to(tl.int32), pos))
    cached_end = tl.minimum(end, pos) if FUSED else end
    return start, end, cached_end


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc, scale):
    """Online-softmax step: fold keys k and values v [BLOCK_N, D] (rows where valid) into the running max m_i,
    sum l_i and weighted sum acc [D] of query q [D]."""
    s = tl.sum(k * q[None, :], axis=1) * scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)
    return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)


@triton.jit
def _decode_attn_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, off_ptr, o_ptr, part_ptr, ml_ptr, qw_ptr, kw_ptr, f_ptr,
                        H, HKV, N_REP, n_keys, keys_per_split, n_splits, stride_cb, stride_ch, stride_qkv, stride_f,
                        scale, eps, HAS_OFFSETS: tl.constexpr, FUSED: tl.constexpr, HAS_NORM: tl.constexpr,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, FIX: tl.constexpr,
                        PDL: tl.constexpr, cnt_ptr=None, SPLITS: tl.constexpr = 0):
    """Program (b * H + h, split): online softmax of query head h over keys [split start, split end) with
    key j <= pos, reading KV head h // N_REP. SINGLE: one split, normalise and store out [B, 1, H * D]; else store
    the unnormalised fp32 accumulator to part [B * H, splits, D] and (max, sum) to ml [B * H, splits, 2], and
    with SPLITS (a power of two >= the splits) the program that arrives last for its head (counter cnt[b * H + h],
    zero before the launch and reset after) merges them into out (`_merge_splits`): no reduction launch.
    HAS_OFFSETS: row b also skips the keys j < off[b] (its left padding) and a padded query (pos < off[b]) reads
    key pos alone. Skipped keys are never loaded, so a row costs only its own length.
    FUSED: q_ptr is the projection qkv [B, (H + 2 HKV) * D] instead of q: the program builds its query head and
    the new key / value of position pos itself (`_rope_head`: the arithmetic of `_qk_rope_cache_kernel`), the
    split that owns pos takes the new key from registers, and one program per (row, KV head) writes it to the
    caches (the other programs read only keys < pos, so nobody reads the slot being written)."""
    pdl_start(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    pos = tl.load(pos_ptr).to(tl.int32)
    offs_d = tl.arange(0, D)
    base = b.to(tl.int64) * stride_cb + (h // N_REP).to(tl.int64) * stride_ch
    start, end, cached_end = _key_range(pos, split, keys_per_split, n_keys, off_ptr, b, HAS_OFFSETS, FUSED)
    # the first key block's loads go out before the query is built (they depend only on pos): at S2's spans every
    # program reads one block, so its key/value latency overlaps the qk-norm and RoPE work
    offs_n = start + tl.arange(0, BLOCK_N)
    valid = offs_n < cached_end
    ptrs = base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    k = tl.load(kc_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    v = tl.load(vc_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    pdl_wait(PDL)  # PDL 3: the keys and values above (older positions) were requested while the projection ran
    if FUSED:
        dtype = o_ptr.dtype.element_ty
        row = q_ptr + b.to(tl.int64) * stride_qkv
        f_row = f_ptr + b * stride_f
        g = h // N_REP
        q = _rope_head(row + h * D, qw_ptr, f_row, eps, D, HAS_NORM, True, dtype, FIX)
        k_new = _rope_head(row + (H + g) * D, kw_ptr, f_row, eps, D, HAS_NORM, True, dtype, FIX)
        v_new = tl.load(row + (H + HKV + g) * D + offs_d, cache_modifier=".cg").to(tl.float32)
        writer = offs_d < tl.where(h % N_REP + split == 0, D, 0)  # split 0 of the KV head's first query head
        slot = base + pos.to(tl.int64) * D + offs_d
        tl.store(kc_ptr + slot, k_new.to(dtype), mask=writer)
        tl.store(vc_ptr + slot, v_new.to(dtype), mask=writer)
        owner = (start <= pos) & (pos < end)  # this split's range holds key pos
    else:
        q = tl.load(q_ptr + bh * D + offs_d, cache_modifier=".cg").to(tl.float32)
    m_i = tl.full([1], -1.0e30, tl.float32)  # finite: an empty split gives weight 0, not NaN
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, scale)
    for n0 in range(start + BLOCK_N, cached_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < cached_end
        ptrs = base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        k = tl.load(kc_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, scale)
    if FUSED:  # key pos, last in order, where this split owns it (weight 0 elsewhere)
        s_new = tl.where(owner, tl.sum(k_new * q, axis=0) * scale, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s_new - m_new)
        acc = acc * alpha + p * v_new
        l_i = l_i * alpha + p
        m_i = m_new
    if SINGLE:
        out = acc / l_i
        tl.store(o_ptr + b * H * D + h * D + offs_d, _round(out, o_ptr.dtype.element_ty, FIX))
    else:
        tl.store(part_ptr + (bh * n_splits + split) * D + offs_d, acc)
        one = tl.arange(0, 1)
        tl.store(ml_ptr + (bh * n_splits + split) * 2 + one, m_i)
        tl.store(ml_ptr + (bh * n_splits + split) * 2 + 1 + one, l_i)
        if SPLITS > 0:
            tl.debug_barrier()  # every thread's stores are issued before the count (release) below
            if tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                _merge_splits(part_ptr, ml_ptr, o_ptr, bh, H, n_splits, D, SPLITS, FIX)
                tl.store(cnt_ptr + bh, 0)


@triton.jit
def _merge_splits(part_ptr, ml_ptr, o_ptr, bh, H, n_splits, D: tl.constexpr, SPLITS: tl.constexpr,
                  FIX: tl.constexpr):
    """Merge head bh's splits' (max, sum, accumulator) into its softmax-weighted output row (".cg": from L2, where
    the other programs of the launch wrote them)."""
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, SPLITS)
    smask = offs_s < n_splits
    row = bh * n_splits + offs_s
    m = tl.load(ml_ptr + row * 2, mask=smask, other=-1.0e30, cache_modifier=".cg")
    l = tl.load(ml_ptr + row * 2 + 1, mask=smask, other=0.0, cache_modifier=".cg")
    w = tl.exp(m - tl.max(m, axis=0))
    offs_d = tl.arange(0, D)
    acc = tl.load(part_ptr + row[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0,
                  cache_modifier=".cg")
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + b * H * D + h * D + offs_d, _round(out, o_ptr.dtype.element_ty, FIX))


# ---- decode attention, one program per KV head: its query heads' scores and sums as tensor-core dots ----------------
@triton.jit
def _rope_heads(row_ptr, heads, live, w_ptr, f_row, eps, D: tl.constexpr, NORM: tl.constexpr, dtype: tl.constexpr,
                FIX: tl.constexpr):
    """`_rope_head` of several heads of one qkv row at once (the same arithmetic): fp32 [heads, D], 0 where not
    live."""
    j = tl.arange(0, D // 2)
    src = row_ptr + heads[:, None] * D + 2 * j[None, :]
    x0 = tl.load(src, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
    x1 = tl.load(src + 1, mask=live[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)
        x0 = _round((x0 * inv[:, None]) * tl.load(w_ptr + 2 * j).to(tl.float32)[None, :], dtype, FIX).to(tl.float32)
        x1 = _round((x1 * inv[:, None]) * tl.load(w_ptr + 2 * j + 1).to(tl.float32)[None, :], dtype,
                    FIX).to(tl.float32)
    cos = tl.load(f_row + 2 * j).to(tl.float32)[None, :]
    sin = tl.load(f_row + 2 * j + 1).to(tl.float32)[None, :]
    re = _round(x0 * cos - x1 * sin, dtype, FIX).to(tl.float32)
    im = _round(x1 * cos + x0 * sin, dtype, FIX).to(tl.float32)
    return tl.interleave(re, im)


@triton.jit
def _attend_heads(q, k, v, valid, m_i, l_i, acc, scale, DOT32: tl.constexpr):
    """`_attend` for the query heads q [QP, D] (in the caches' dtype, exact) of one KV head: scores by one dot,
    the weighted values by two (the fp32 weights split into a high and a low part in the caches' dtype, so the
    sum keeps ~16 bits more of each weight than one rounding would). DOT32: fp32 dots instead (triton's
    interpreter multiplies 16-bit float tiles wrongly; on a GPU fp32 dots would round to tf32)."""
    if DOT32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale  # [QP, BLOCK_N] fp32
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    if DOT32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None])
    else:
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = tl.dot(p_lo, v, tl.dot(p_hi, v, acc * alpha[:, None]))
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _decode_attn_gqa_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, off_ptr, o_ptr, part_ptr, ml_ptr, qw_ptr, kw_ptr, f_ptr,
                            H, HKV, n_keys, keys_per_split, n_splits, stride_cb, stride_ch, stride_qkv, stride_f,
                            scale, eps, HAS_OFFSETS: tl.constexpr, FUSED: tl.constexpr, HAS_NORM: tl.constexpr,
                            D: tl.constexpr, BLOCK_N: tl.constexpr, N_REP: tl.constexpr, QP: tl.constexpr,
                            SINGLE: tl.constexpr, FIX: tl.constexpr, PDL: tl.constexpr, cnt_ptr=None,
                            SPLITS: tl.constexpr = 0, NR: tl.constexpr = 1, DOT32: tl.constexpr = False):
    """`_decode_attn_kernel` with one program per (b * HKV + KV head g, split) for the N_REP query heads
    g * N_REP .. that read KV head g: each key block is loaded once for all of them, and the heads' scores and
    weighted values are tensor-core dots of QP (>= 16) rows. bf16 / fp16 caches. The arrival counter is per KV
    head (cnt[b * HKV + g]); the last program merges its N_REP heads' splits (`_merge_heads`, NR = N_REP rounded
    up to a power of two)."""
    pdl_start(PDL)
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    pos = tl.load(pos_ptr).to(tl.int32)
    offs_d = tl.arange(0, D)
    r = tl.arange(0, QP)
    live = r < N_REP
    heads = g * N_REP + r
    base = b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch
    start, end, cached_end = _key_range(pos, split, keys_per_split, n_keys, off_ptr, b, HAS_OFFSETS, FUSED)
    offs_n = start + tl.arange(0, BLOCK_N)
    valid = offs_n < cached_end
    ptrs = base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    k = tl.load(kc_ptr + ptrs, mask=valid[:, None], other=0.0)
    v = tl.load(vc_ptr + ptrs, mask=valid[:, None], other=0.0)
    pdl_wait(PDL)
    dtype = o_ptr.dtype.element_ty
    if FUSED:
        row = q_ptr + b.to(tl.int64) * stride_qkv
        f_row = f_ptr + b * stride_f
        q = _rope_heads(row, heads, live, qw_ptr, f_row, eps, D, HAS_NORM, dtype, FIX)
        k_new = _rope_head(row + (H + g) * D, kw_ptr, f_row, eps, D, HAS_NORM, True, dtype, FIX)
        v_new = tl.load(row + (H + HKV + g) * D + offs_d, cache_modifier=".cg").to(tl.float32)
        writer = offs_d < tl.where(split == 0, D, 0)  # split 0 of each KV head writes its new key and value
        slot = base + pos.to(tl.int64) * D + offs_d
        tl.store(kc_ptr + slot, k_new.to(dtype), mask=writer)
        tl.store(vc_ptr + slot, v_new.to(dtype), mask=writer)
        owner = (start <= pos) & (pos < end)
    else:
        q = tl.load(q_ptr + (b * H + heads)[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0,
                    cache_modifier=".cg").to(tl.float32)
    qd = q.to(dtype)  # exact: the query was rounded to the activation dtype
    m_i = tl.full([QP], -1.0e30, tl.float32)
    l_i = tl.zeros([QP], tl.float32)
    acc = tl.zeros([QP, D], tl.float32)
    m_i, l_i, acc = _attend_heads(qd, k, v, valid, m_i, l_i, acc, scale, DOT32)
    for n0 in range(start + BLOCK_N, cached_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < cached_end
        ptrs = base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        k = tl.load(kc_ptr + ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(vc_ptr + ptrs, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _attend_heads(qd, k, v, valid, m_i, l_i, acc, scale, DOT32)
    if FUSED:  # key pos, last in order, where this split owns it
        s_new = tl.where(owner, tl.sum(q * k_new[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s_new - m_new)
        acc = acc * alpha[:, None] + p[:, None] * v_new[None, :]
        l_i = l_i * alpha + p
        m_i = m_new
    bh = b * H + heads
    if SINGLE:
        out = acc / l_i[:, None]
        tl.store(o_ptr + bh[:, None] * D + offs_d[None, :], _round(out, dtype, FIX), mask=live[:, None])
    else:
        tl.store(part_ptr + (bh[:, None] * n_splits + split) * D + offs_d[None, :], acc, mask=live[:, None])
        tl.store(ml_ptr + (bh * n_splits + split) * 2, m_i, mask=live)
        tl.store(ml_ptr + (bh * n_splits + split) * 2 + 1, l_i, mask=live)
        if SPLITS > 0:
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr + bg, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                _merge_heads(part_ptr, ml_ptr, o_ptr, b * H + g * N_REP, n_splits, D, SPLITS, NR, N_REP, FIX)
                tl.store(cnt_ptr + bg, 0)


@triton.jit
def _merge_heads(part_ptr, ml_ptr, o_ptr, bh0, n_splits, D: tl.constexpr, SPLITS: tl.constexpr, NR: tl.constexpr,
                 N_REP: tl.constexpr, FIX: tl.constexpr):
    """`_merge_splits` for the N_REP heads bh0 .. bh0 + N_REP - 1 at once ([NR, SPLITS, D] loads)."""
    r = tl.arange(0, NR)
    offs_s = tl.arange(0, SPLITS)
    mask = (r[:, None] < N_REP) & (offs_s[None, :] < n_splits)
    row = (bh0 + r)[:, None] * n_splits + offs_s[None, :]  # [NR, SPLITS]
    m = tl.load(ml_ptr + row * 2, mask=mask, other=-1.0e30, cache_modifier=".cg")
    l = tl.load(ml_ptr + row * 2 + 1, mask=mask, other=0.0, cache_modifier=".cg")
    w = tl.exp(m - tl.max(m, axis=1)[:, None])
    offs_d = tl.arange(0, D)
    acc = tl.load(part_ptr + row[:, :, None] * D + offs_d[None, None, :], mask=mask[:, :, None], other=0.0,
                  cache_modifier=".cg")
    out = tl.sum(acc * w[:, :, None], axis=1) / tl.sum(l * w, axis=1)[:, None]
    tl.store(o_ptr + (bh0 + r)[:, None] * D + offs_d[None, :], _round(out, o_ptr.dtype.element_ty, FIX),
             mask=(r < N_REP)[:, None])


@triton.jit
def _decode_attn_reduce_kernel(part_ptr, ml_ptr, o_ptr, H, n_splits,
                               D: tl.constexpr, SPLITS: tl.constexpr, FIX: tl.constexpr, PDL: tl.constexpr):
    """Program b * H + h: `_merge_splits` as a launch of its own (S2CONV_ATTN_MERGE=launch)."""
    pdl_start(PDL)
    _merge_splits(part_ptr, ml_ptr, o_ptr, tl.program_id(0), H, n_splits, D, SPLITS, FIX)


def attention_splits(span: int, rows: int, device: torch.device, block_n: int = ATTN_BLOCK_N,
                     per_sm: int = 4, max_splits: int | None = None) -> tuple[int, int]:
    """(number of key splits, keys per split) so that about `per_sm` programs per SM read the span's keys (at
    most max_splits of them per row); a split is a whole number of block_n key blocks. rows = programs per split
    (B * H query rows, or B * HKV for the grouped kernel)."""
    blocks = -(-span // block_n)
    want = max(1, min(blocks, -(-per_sm * _sm_count(device) // max(rows, 1)), max_splits or blocks))
    per = -(-blocks // want) * block_n
    return -(-span // per), per


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, span: int | None = None,
                     n_rep: int | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per head, q [B, H, 1, D], over the cached keys 0..pos (pos: a 1-element device
    tensor or an int; later slots are masked), with GQA: query head h reads KV head h // n_rep of
    k_cache / v_cache [B, Hkv, max_seq, D]. span (a Python int > pos, default max_seq) bounds the keys read and
    fixes the launch grid, so one CUDA graph serves every pos < span. Scale 1/sqrt(D), fp32 softmax.
    offsets (optional [B] integer device tensor, the pad offsets of left-padded rows): row b reads only the keys
    offsets[b] <= j <= pos, or key pos alone when pos < offsets[b] (`batch.row_mask` at one decode position).
    Returns [B, 1, H * D] in q's dtype. One kernel, or two when the key axis is split (flash-decoding).
    """
    op = "decode_attention"
    if q.dim() != 4 or q.shape[2] != 1:
        raise _fail(op, "q", "[B, H, 1, D]", tuple(q.shape))
    b, h, _, d = q.shape
    n_kv = k_cache.shape[1]
    n_rep = n_rep or h // max(n_kv, 1)
    if n_rep * n_kv != h:
        raise _fail(op, "n_rep * KV heads", f"the {h} query heads", f"{n_rep} * {n_kv}")
    if d & (d - 1):
        raise _fail(op, "head_dim", "a power of two", d)
    return _attention(op, q.contiguous(), None, k_cache, v_cache, pos, span, b, h, n_kv, d, offsets)


def rope_attention(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                   freqs_cis_row: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos, span: int,
                   n_head: int, n_kv_head: int, eps: float = 1e-6, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """`qk_norm_rope_cache` followed by `decode_attention`, in the attention kernel's launch: one decode step's
    projection qkv [B, 1, (H + 2 Hkv) * D] -> attention output [B, 1, H * D], writing the new key and value into
    the caches at pos. Arguments as in those two functions (one launch fewer per transformer block)."""
    op = "rope_attention"
    b, width = qkv.shape[0], qkv.shape[-1]
    if n_head % n_kv_head:
        raise _fail(op, "query heads", f"a multiple of the {n_kv_head} KV heads", n_head)
    d, freqs = _check_qkv(op, qkv, q_norm_w, k_norm_w, freqs_cis_row, n_head, n_kv_head)
    fused_args = (q_norm_w, k_norm_w, freqs, 0 if freqs.shape[0] == 1 else d, eps)
    return _attention(op, _rows(op, qkv, width), fused_args, k_cache, v_cache, pos, span, b, n_head, n_kv_head, d,
                      offsets)


def _attention(op: str, q: torch.Tensor, fused_args: tuple | None, k_cache, v_cache, pos, span, b: int, h: int,
               n_kv: int, d: int, offsets) -> torch.Tensor:
    """Launch `_decode_attn_kernel` (+ the split reduction with S2CONV_ATTN_MERGE=launch); q: q [B, H, 1, D], or
    qkv rows [B, width] with fused_args = (q_norm_w, k_norm_w, freqs [1 or B, D], freqs row stride, eps)."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cache(op, name, cache, b, n_kv, d, q.dtype)
    if offsets is not None and (offsets.shape != (b,) or offsets.dtype.is_floating_point or offsets.is_complex()
                                or offsets.device != q.device):
        raise _fail(op, "offsets", f"an integer tensor of shape ({b},) on {q.device}",
                    f"{tuple(offsets.shape)} {offsets.dtype} on {offsets.device}")
    span = min(span or k_cache.shape[2], k_cache.shape[2])
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    pos_t = _pos_tensor(pos, q.device)
    if span > ATTN_GQA_SPAN and h > n_kv and q.dtype in (torch.bfloat16, torch.float16) and d >= 16:
        return _attention_gqa(q, fused_args, k_cache, v_cache, pos_t, span, b, h, n_kv, d, offsets, out)
    # small steps and few warps: the fast AR's 10 keys in one 16-key step on one warp took 2.24 us a launch against
    # 3.19 for 64 keys on 4 warps, the slow AR's 64-key steps 7.39 us on 2 warps against 7.68 on 4 (H100,
    # scripts/probe_attention.py, bench/RESULTS.md): an attention program is a chain of latencies, and a smaller
    # program waits less at each of its reductions
    block_n = min(ATTN_BLOCK_N, max(16, triton.next_power_of_2(span)))
    warps = ATTN_WARPS or max(1, block_n // 32)
    n_splits, per = attention_splits(span, b * h, q.device, block_n)
    single = n_splits == 1
    part, ml = _split_buffers(out, b * h, n_splits, d)
    qw, kw, freqs, stride_f, eps = fused_args or (None, None, out, 0, 0.0)
    has_norm = qw is not None
    fix = _fix(q.dtype)
    # the splits merged by the last program of each head (one launch, not two: bench/RESULTS.md, thirteenth
    # session); S2CONV_ATTN_MERGE=launch keeps the reduction kernel
    merge_in = not single and os.environ.get("S2CONV_ATTN_MERGE", "") != "launch"
    launch_early(
        _decode_attn_kernel, (b * h, n_splits),
        q, k_cache, v_cache, pos_t, pos_t if offsets is None else offsets, out, part, ml,
        qw if has_norm else freqs, kw if has_norm else freqs, freqs, h, n_kv, h // n_kv, span, per, n_splits,
        k_cache.stride(0), k_cache.stride(1), q.stride(0), stride_f, 1.0 / math.sqrt(d), float(eps),
        HAS_OFFSETS=offsets is not None, FUSED=fused_args is not None, HAS_NORM=has_norm, D=d,
        BLOCK_N=block_n, SINGLE=single, FIX=fix, num_warps=warps, outputs=(out,),
        cnt_ptr=counters(q.device, b * h) if merge_in else pos_t,
        SPLITS=triton.next_power_of_2(n_splits) if merge_in else 0, **_attention_pdl(q.device, fused_args))
    if not single and not merge_in:
        launch(_decode_attn_reduce_kernel, (b * h,), part, ml, out, h, n_splits, D=d,
               SPLITS=triton.next_power_of_2(n_splits), FIX=fix, num_warps=ATTN_REDUCE_WARPS, outputs=(out,),
               **pdl_args(q.device))
    return out


def _attention_pdl(device: torch.device, fused_args: tuple | None) -> dict:
    """The attention's PDL mode: early (`launch.early_pdl`) where it builds the new key and value itself (FUSED),
    so that everything it requests before its wait is older than its predecessor; given q (batched rows), key pos
    is in the caches already, written by the kernel just before (`qk_norm_rope_cache`): `pdl_args`."""
    return early_pdl(device) if fused_args is not None else pdl_args(device)


def _split_buffers(out: torch.Tensor, rows: int, n_splits: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split path's fp32 partial sums [rows, splits, D] and (max, sum) pairs [rows, splits, 2]; one split
    needs neither (out stands in for the unused pointers)."""
    if n_splits == 1:
        return out, out
    return (torch.empty(rows, n_splits, d, dtype=torch.float32, device=out.device),
            torch.empty(rows, n_splits, 2, dtype=torch.float32, device=out.device))


def _attention_gqa(q: torch.Tensor, fused_args: tuple | None, k_cache, v_cache, pos_t, span: int, b: int, h: int,
                   n_kv: int, d: int, offsets, out: torch.Tensor) -> torch.Tensor:
    """`_attention` through `_decode_attn_gqa_kernel` (one program per KV head and key split; its splits always
    merge inside the launch, S2CONV_ATTN_MERGE notwithstanding). fp16 caches: softmax weights below fp16's
    smallest subnormal (~6e-8 of the row maximum's) drop out of the weighted sum but not of the normalizer, a
    relative error under span * 6e-8."""
    n_rep = h // n_kv
    block_n = min(ATTN_GQA_BLOCK_N, max(16, triton.next_power_of_2(span)))
    n_splits, per = attention_splits(span, b * n_kv, q.device, block_n, ATTN_GQA_PER_SM, ATTN_GQA_MAX_SPLITS)
    single = n_splits == 1
    part, ml = _split_buffers(out, b * h, n_splits, d)
    qw, kw, freqs, stride_f, eps = fused_args or (None, None, out, 0, 0.0)
    has_norm = qw is not None
    nr = triton.next_power_of_2(n_rep)
    launch_early(
        _decode_attn_gqa_kernel, (b * n_kv, n_splits),
        q, k_cache, v_cache, pos_t, pos_t if offsets is None else offsets, out, part, ml,
        qw if has_norm else freqs, kw if has_norm else freqs, freqs, h, n_kv, span, per, n_splits,
        k_cache.stride(0), k_cache.stride(1), q.stride(0), stride_f, 1.0 / math.sqrt(d), float(eps),
        HAS_OFFSETS=offsets is not None, FUSED=fused_args is not None, HAS_NORM=has_norm, D=d,
        BLOCK_N=block_n, N_REP=n_rep, QP=max(16, nr), SINGLE=single, FIX=_fix(q.dtype), num_warps=ATTN_GQA_WARPS,
        outputs=(out,), cnt_ptr=counters(q.device, b * n_kv) if not single else pos_t,
        SPLITS=triton.next_power_of_2(n_splits) if not single else 0, NR=nr, DOT32=_INTERPRETED,
        **_attention_pdl(q.device, fused_args))
    return out


# ---- SwiGLU gate -------------------------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(a_ptr, b_ptr, y_ptr, N, stride_a, stride_b, BLOCK: tl.constexpr, FIX: tl.constexpr,
                     PDL: tl.constexpr):
    """y = round(round(silu(a)) * b): eager's F.silu(a) * b with its two roundings."""
    pdl_start(PDL)
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + row * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    s = _round(a / (1.0 + tl.exp(-a)), dtype, FIX).to(tl.float32)
    tl.store(y_ptr + row * N + offs, _round(s * bv, dtype, FIX), mask=mask)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b [..., N] of one dtype (views with strided rows, e.g. halves of one w1|w3 GEMV output,
    are read in place). Returns a new contiguous tensor of a's shape."""
    op = "silu_mul"
    if a.shape != b.shape or a.dtype != b.dtype:
        raise _fail(op, "b", f"{tuple(a.shape)} {a.dtype} like a", f"{tuple(b.shape)} {b.dtype}")
    n = a.shape[-1]
    a2, b2 = _rows(op, a, n), _rows(op, b, n)
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    block = min(1024, triton.next_power_of_2(n))
    launch(_silu_mul_kernel, (triton.cdiv(n, block), a2.shape[0]), a2, b2, y, n, a2.stride(0), b2.stride(0),
           BLOCK=block, FIX=_fix(a.dtype), num_warps=4, outputs=(y,), **pdl_args(a.device))
    return y
