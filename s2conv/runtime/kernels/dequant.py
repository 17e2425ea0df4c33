"""Dequantize a packed weight (any kernel layout of layout.py) into a dense [N, K] matrix in one Triton pass.

Prefill multiplies hundreds of prompt rows by each weight. The fused kernels decode a weight tile once per tile of
x rows (the tensor-core kernel's programs take 8 rows), so at 1500 rows they decode every weight 24-188 times
and took 1.5-4.5x cuBLAS's time on the same product (bench/RESULTS.md, seventeenth session). From `PREFILL_M`
rows on, the launchers decode the weight once with `dequantize` and multiply with cuBLAS: the result is the
reference path's exactly (QuantLinear dequantizes in fp32, rounds once to x's dtype, then F.linear), only faster.

Each program writes a [BLOCK_N, BLOCK_K] tile. The index arithmetic inverts the packing of layout.py element by
element (a gather of the words, which the tile's neighbours share through L1): `pack_int_codes` (interleaved
rows, slot-planar blocks), `pack_fragment_codes` (mma.sync A-fragment order) or a plain row-major matrix.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from s2conv.runtime.kernels.common import round_to
from s2conv.runtime.kernels.launch import launch
from s2conv.errors import RuntimeModelError
from s2conv.runtime.kernels.layout import (INT_SPECS, fragment_chunk, fragment_chunk_words, fragment_unit,
                                          uses_fragment_layout, uses_row_major_layout)

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# rows of x from which the launchers dequantize once and call cuBLAS (S2CONV_PREFILL_M overrides it)
PREFILL_M = int(os.environ.get("S2CONV_PREFILL_M", "128"))
_ROW_MAJOR, _INTERLEAVED, _FRAGMENT = 0, 1, 2


@triton.jit
def _field_bit(i, bits: tl.constexpr):
    """layout.field_bit: bit position of field i of a word of `bits`-bit fields."""
    return 8 * (i % 4) + bits * (i // 4)


@triton.jit
def _interleaved_code(q_ptr, n, k, live, words_per_row, BITS: tl.constexpr):
    """Unsigned code (n, k) of the interleaved layout (`pack_int_codes`): block k // 512, slot (k % 512) // 16,
    word column k % 16; rows interleaved in groups of 16 (word w of row n at ((n // 16) * W + w) * 16 + n % 16)."""
    blk = k // 512
    slot = (k % 512) // 16
    wi = k % 16
    row = (n // 16).to(tl.int64) * words_per_row * 16 + n % 16
    if BITS == 3:  # two 2-bit low sub-tiles, then the high-bit sub-tile (`unpack_int_codes`)
        lo = tl.load(q_ptr + row + ((blk * 3 + slot // 16) * 16 + wi) * 16, mask=live, other=0)
        hi = tl.load(q_ptr + row + ((blk * 3 + 2) * 16 + wi) * 16, mask=live, other=0)
        return ((lo >> _field_bit(slot % 16, 2)) & 3) | (((hi >> _field_bit(slot, 1)) & 1) << 2)
    per: tl.constexpr = 32 // BITS  # fields per word
    word = tl.load(q_ptr + row + ((blk * BITS + slot // per) * 16 + wi) * 16, mask=live, other=0)
    return (word >> _field_bit(slot % per, BITS)) & ((1 << BITS) - 1)


@triton.jit
def _fragment_code(q_ptr, n, k, live, stride_q, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Unsigned code (n, k) of the fragment layout (`pack_fragment_codes`): row n = 16 tile + 8 h + g; in chunk
    k // CHUNK, k = sub j + 4 SPS q + 4 s' + 2 kk + e sits in word (4 g + q) * 4 + 2 kk + h of the chunk's first
    128, at bit 16 e + BITS (j SPS + s') (3-bit: the low two bits so, the high one in word 128 + 2 (4 g + q) + kk
    at bit 16 e + 8 (step // 4) + 4 h + step % 4)."""
    CHUNK: tl.constexpr = 128 if BITS == 3 else 256 // BITS
    CW: tl.constexpr = CHUNK * BITS // 2  # words per chunk
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    SUB: tl.constexpr = GROUP if GROUP < CHUNK else CHUNK
    SPS: tl.constexpr = SUB // 16
    r = n % 16
    kc = k % CHUNK
    rem = kc % SUB
    r2 = rem % (4 * SPS)
    lane = 4 * (r % 8) + rem // (4 * SPS)
    kk = (r2 % 4) // 2
    step = (kc // SUB) * SPS + r2 // 4
    base = q_ptr + (n // 16).to(tl.int64) * stride_q + (k // CHUNK) * CW
    w = tl.load(base + lane * 4 + 2 * kk + r // 8, mask=live, other=0)
    code = (w >> (16 * (r2 % 2) + LOW * step)) & ((1 << LOW) - 1)
    if BITS == 3:
        hw = tl.load(base + 128 + 2 * lane + kk, mask=live, other=0)
        code = code | (((hw >> (16 * (r2 % 2) + 8 * (step // 4) + 4 * (r // 8) + step % 4)) & 1) << 2)
    return code


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, m_ptr, out_ptr, N, K, stride_q, stride_s, n_sup,
                    LAYOUT: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, GROUP: tl.constexpr,
                    HAS_MIN: tl.constexpr, KQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    FIX: tl.constexpr):
    """out[n, k] = code * scale (- min) in fp32, rounded to out's dtype, for the tile of program (n, k).

    GROUP 0: one scale per row (fp8, q8), the codes read as they are stored (row-major layout); otherwise the
    scales (and mins) [rows, groups] with row stride stride_s, or with KQ the two levels of the K-quants: int16
    sc | m << 8 per group (signed bytes) [rows, groups] and fp32 (d, dmin) per KQ groups [rows, n_sup, 2]. FIX:
    round to bf16 by hand (`common.round_to`: triton's interpreter truncates)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    live = (n < N) & (k < K)  # masks, not clamped indices: the row-major tile's loads and stores stay vectors
    if LAYOUT == 0:
        code = tl.load(q_ptr + n.to(tl.int64) * stride_q + k, mask=live, other=0.0).to(tl.float32)  # 0.0: fp8 too
    elif LAYOUT == 1:
        code = (_interleaved_code(q_ptr, n, k, live, stride_q, BITS) - OFF).to(tl.float32)
    else:
        code = (_fragment_code(q_ptr, n, k, live, stride_q, BITS, GROUP) - OFF).to(tl.float32)
    if GROUP == 0:
        w = code * tl.load(s_ptr + n, mask=n < N, other=0.0)
    elif KQ > 0:
        v = tl.load(s_ptr + n * stride_s + k // GROUP, mask=live, other=0).to(tl.int32)
        sup = m_ptr + (n * n_sup + k // (GROUP * KQ)) * 2
        w = code * (((v << 24) >> 24).to(tl.float32) * tl.load(sup, mask=live, other=0.0))  # signed bytes
        if HAS_MIN:
            w = w - (v >> 8).to(tl.float32) * tl.load(sup + 1, mask=live, other=0.0)
    else:
        w = code * tl.load(s_ptr + n * stride_s + k // GROUP, mask=live, other=0.0).to(tl.float32)
        if HAS_MIN:
            w = w - tl.load(m_ptr + n * stride_s + k // GROUP, mask=live, other=0.0)
    tl.store(out_ptr + n.to(tl.int64) * K + k, round_to(w, out_ptr.dtype.element_ty, FIX), mask=live)


def _check_k(fmt: str, layout: int, q: torch.Tensor, bits: int, group: int, k: int) -> None:
    """k (the columns of x) must be the weight's K: the kernel would otherwise read past the packed rows."""
    if layout == _ROW_MAJOR:
        lo, hi = q.shape[1], q.shape[1]
    elif layout == _INTERLEAVED:
        hi = q.shape[1] * 32 // bits  # K padded to whole 512-code blocks
        lo = hi - 511
    else:
        hi = q.shape[1] // fragment_chunk_words(bits) * fragment_chunk(bits)  # K padded to whole units
        lo = hi - fragment_unit(bits, group) + 1
    if not lo <= k <= hi:
        raise RuntimeModelError(f"dequantize {fmt}: K (columns of x) must be in [{lo}, {hi}] for this weight, "
                                f"got {k}")


def dequantize(fmt: str, packed: dict, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight [N, k] of a packed dict (`REPACK[fmt]` output; N = the scales' rows) in `dtype`: what
    `layout.dequantize_packed` computes (fp32 products, one rounding), in one launch. bf16 weights are returned
    as they are. As there, not for `cat_rows` output in general: its halves keep their own row padding."""
    if fmt == "bf16":
        return packed["weight"].to(dtype)
    scales = packed["scales"]
    n = scales.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=scales.device)
    mins = packed.get("mins")
    spec = INT_SPECS.get(fmt)
    layout, bits, off, group, kq, n_sup = _ROW_MAJOR, 8, 0, 0, 0, 0
    if spec is not None:
        bits, off, group = spec.bits, spec.offset, spec.group
        if uses_fragment_layout(spec):
            layout = _FRAGMENT
        elif not uses_row_major_layout(spec):
            layout = _INTERLEAVED
        if scales.dtype == torch.int16:  # two levels (fragment layout): (d, dmin) per super-block in "mins"
            n_sup = mins.shape[1]
            kq = scales.shape[1] // n_sup
    q = packed["weight"] if layout == _ROW_MAJOR else packed["qweight"]
    _check_k(fmt, layout, q, bits, group, k)
    has_min = mins is not None and (kq == 0 or spec.has_min)  # two levels: "mins" holds (d, dmin) either way
    block_n, block_k = 16, 256
    launch(_dequant_kernel, (triton.cdiv(n, block_n), triton.cdiv(k, block_k)),
           q, scales, scales if mins is None else mins, out, n, k, q.shape[1],
           scales.stride(0) if scales.dim() == 2 else 0, n_sup,
           LAYOUT=layout, BITS=bits, OFF=off, GROUP=group, HAS_MIN=has_min, KQ=kq, BLOCK_N=block_n,
           BLOCK_K=block_k, FIX=_INTERPRETED and dtype == torch.bfloat16, num_warps=4, outputs=(out,))
    return out
