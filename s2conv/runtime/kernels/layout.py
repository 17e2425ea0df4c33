"""Kernel-side weight layouts: format specs, `repack_<fmt>` (codes + scales -> packed tensors) and the inverse.

These layouts exist only in GPU memory at run time; the files on disk keep the storage formats of
`s2conv.quant_formats`. Pure torch, no triton: the model can repack (and fall back to `dequantize_packed`)
on machines without triton.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from s2conv.errors import QuantFormatError
from s2conv.quant_formats.base import two_level_scales

# ---- the integer layout ("slot-planar blocks, 16 interleaved rows") --------------------------------------------
# Every row of the weight is cut into blocks of BLOCK_K = 512 codes (the last block is padded with zero codes).
# Inside a block, code k_local = 16 * slot + word (slot 0..31, word 0..15). A b-bit format (b in 2, 4, 8) stores a
# block as b sub-tiles of 16 int32 words; in sub-tile t, field i (i = 0 .. 32/b - 1) of word w holds the unsigned
# code u = code + offset of slot 32/b * t + i. So one field extracted from a 16-word sub-tile gives the codes of
# 16 *consecutive* k, multiplied with 16 consecutive x: no shuffles in the kernel. Field i sits at bit
# `field_bit(i, b)` = 8 * (i % 4) + b * (i // 4): byte i % 4 of the word, so that one shift and one mask,
# (word >> b * e) & byte_mask(b), put fields 4e .. 4e + 3 in the four bytes in order (what the integer-dot GEMV
# multiplies, two bytes per dp2a). 3-bit uses 3 sub-tiles: two 2-bit sub-tiles (low bits of slots 0..15 and
# 16..31) and one 1-bit sub-tile whose field s (bit field_bit(s, 1)) is the high bit of slot s.
# A row is W = n_blocks * 16 * b words: [block 0: sub-tile 0 | sub-tile 1 | ...][block 1: ...]...
# Rows are then interleaved in groups of ROWS = 16 (N padded up with zero codes): word j of the group's row r is
# stored at group * 16 W + 16 j + r. A thread's 16-byte load thus holds one word of 4 rows, which meet the same x
# values: the kernel converts and scales each x once for 4 rows (with one row per load, x work doubled the
# instructions per code). One row group's block is a single contiguous 64 b * 16-byte piece.
# qweight is int32 [N_pad, W] (N_pad = ROWS * ceil(N / ROWS)) in that storage order: its dim-0 index is a storage
# row, not a weight row, except that the first ROWS * g storage rows hold exactly the first ROWS * g weight rows.
# Scales keep the weight's own rows: [N, groups]. The packing takes 8-bit codes too, but the kernels that read this
# layout (`triton_int`) take 2-4-bit codes without mins in groups of 32+ codes: q4, q4_0, q3, q2 and tq2_0 use it
# (the other formats: the fragment and row-major layouts below).
BLOCK_K = 512
WORDS = 16  # int32 words per sub-tile and row: 64 contiguous bytes
SLOTS = BLOCK_K // WORDS
ROWS = 16  # interleaved rows per group


@dataclass(frozen=True)
class IntSpec:
    """An integer kernel format: w = scale[n, k // group] * (code - ...) (- min[n, k // group] when asymmetric).

    code_min/code_max: the accepted signed code range (asymmetric formats: 0..2**bits-1);
    offset: added to a code to store it unsigned; group: codes per scale along K (per-row formats read their
    codes row-major, as the float formats: `FLOAT_FORMATS`); half_scales: the file's scales are fp16, and the
    interleaved layout keeps them so (where they are, exactly: `repack_int`).
    """

    bits: int
    code_min: int
    code_max: int
    offset: int
    group: int
    has_min: bool = False
    half_scales: bool = False


INT_SPECS: dict[str, IntSpec] = {
    "q4": IntSpec(4, -7, 7, 8, 128),
    "q3": IntSpec(3, -3, 3, 4, 128),
    "q2": IntSpec(2, -1, 1, 2, 64),
    "q8_0": IntSpec(8, -128, 127, 128, 32),
    "q4_0": IntSpec(4, -8, 7, 8, 32, half_scales=True),
    # the other ggml types, from their integer codes (QuantFormat.integer_codes_torch): w = scale * code (- min),
    # scales (and mins) decoded to float32 per group; K-quants per sub-block (d * sc, dmin * m). 5- and 6-bit codes
    # are int8 codes in the grouped row-major layout (below), and so are q8_0's. Q3_K's 3-bit codes are stored
    # unsigned (q + 4) with its signed sub-block scale sc and 4 sc as the min: the two levels of
    # the K-quants with mins, in the fragment layout.
    "q4_1": IntSpec(4, 0, 15, 0, 32, has_min=True),
    "q5_0": IntSpec(8, -16, 15, 128, 32),
    "q5_1": IntSpec(8, 0, 31, 0, 32, has_min=True),
    "tq2_0": IntSpec(2, -1, 1, 2, 256),
    "q2_k": IntSpec(2, 0, 3, 0, 16, has_min=True),
    "q3_k": IntSpec(3, 0, 7, 0, 16, has_min=True),  # w = d * sc * (q + 4) - d * 4 sc
    "q4_k": IntSpec(4, 0, 15, 0, 32, has_min=True),
    "q5_k": IntSpec(8, 0, 31, 0, 32, has_min=True),
    "q6_k": IntSpec(8, -32, 31, 128, 16),
}
# formats whose weight stays a plain row-major [N, K] matrix (one byte or two per weight) read by the float kernels:
# fp8 e4m3 and q8 (s2conv's per-row INT8: int8 codes in [-127, 127]) with a float32 scale per row, bf16
FLOAT_FORMATS = ("fp8", "q8", "bf16")


def field_bit(i: int, bits: int) -> int:
    """Bit position of field i of a `bits`-bit word (see the layout notes above)."""
    return 8 * (i % 4) + bits * (i // 4)


def byte_mask(bits: int) -> int:
    """The mask that keeps the low `bits` bits of each byte of a word."""
    return ((1 << bits) - 1) * 0x01010101


def _field_shifts(bits: int, device) -> torch.Tensor:
    return torch.tensor([field_bit(i, bits) for i in range(32 // bits)], dtype=torch.int64, device=device)


def padded_rows(n: int) -> int:
    """Rows of the integer layout's qweight: n rounded up to a whole number of ROWS-row groups."""
    return -(-n // ROWS) * ROWS


def padded_k(k: int) -> int:
    """Row length of the integer layout: k rounded up to a whole number of 512-code blocks."""
    return -(-k // BLOCK_K) * BLOCK_K


def _check_codes(fmt: str, codes: torch.Tensor, spec: IntSpec) -> None:
    if codes.dim() != 2:
        raise QuantFormatError(f"repack_{fmt}: codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise QuantFormatError(f"repack_{fmt}: codes must be an integer tensor, got {codes.dtype}")
    k = codes.shape[1]
    if k == 0 or k % spec.group:
        raise QuantFormatError(f"repack_{fmt}: K={k} is not a positive multiple of the group size {spec.group}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < spec.code_min or hi > spec.code_max:
            raise QuantFormatError(
                f"repack_{fmt}: codes span [{lo}, {hi}], outside the format's range [{spec.code_min}, {spec.code_max}]"
            )


def _check_scales(fmt: str, name: str, s: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(s.shape) != shape:
        raise QuantFormatError(f"repack_{fmt}: {name} must have shape {shape}, got {tuple(s.shape)}")
    if not s.dtype.is_floating_point:
        raise QuantFormatError(f"repack_{fmt}: {name} must be floating point, got {s.dtype}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_fields(u: torch.Tensor, bits: int) -> torch.Tensor:
    """u int64 [N, nb, 32 // bits * t, 16] (slot-major) -> int32 words [N, nb, t, 16]; field i at field_bit(i, bits)."""
    n, nb, slots, w = u.shape
    per_word = 32 // bits
    u = u.reshape(n, nb, slots // per_word, per_word, w)
    shifts = _field_shifts(bits, u.device).view(1, 1, 1, per_word, 1)
    return _to_int32((u << shifts).sum(dim=3))


def pack_int_codes(codes: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    """Signed codes [N, K] -> qweight int32 [padded_rows(N), padded_k(K) // 32 * bits] in the layout above."""
    n0, k = codes.shape
    n, kp = padded_rows(n0), padded_k(k)
    u = codes.to(torch.int64) + offset
    if kp != k or n != n0:  # padding codes decode to 0 (and meet x = 0 in the kernels anyway)
        u = torch.nn.functional.pad(u, (0, kp - k, 0, n - n0), value=offset)
    u = u.view(n, kp // BLOCK_K, SLOTS, WORDS)
    if bits == 3:
        lo = _pack_fields(u & 3, 2)  # [N, nb, 2, 16]
        hi = _pack_fields((u >> 2) & 1, 1)  # [N, nb, 1, 16]
        words = torch.cat([lo, hi], dim=2)
    else:
        words = _pack_fields(u, bits)
    w = words.numel() // n
    return words.reshape(n // ROWS, ROWS, w).transpose(1, 2).contiguous().reshape(n, w)


def unpack_int_codes(qweight: torch.Tensor, bits: int, offset: int, k: int, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int_codes`: qweight int32 [N_pad, W] -> signed codes int16 [n, k] (n: default N_pad)."""
    n_pad, w = qweight.shape
    n = n_pad if n is None else n
    rows = qweight.reshape(n_pad // ROWS, w, ROWS).transpose(1, 2).reshape(n_pad, w)[:n]
    words = rows.to(torch.int64) & 0xFFFFFFFF
    words = words.view(n, -1, 3 if bits == 3 else bits, WORDS)

    def fields(w: torch.Tensor, b: int) -> torch.Tensor:  # [N, nb, t, 16] -> [N, nb, t * 32 // b, 16]
        shifts = _field_shifts(b, w.device).view(1, 1, 1, -1, 1)
        f = (w.unsqueeze(3) >> shifts) & ((1 << b) - 1)
        return f.reshape(n, w.shape[1], -1, WORDS)

    if bits == 3:
        u = fields(words[:, :, :2], 2) | (fields(words[:, :, 2:], 1) << 2)
    else:
        u = fields(words, bits)
    return (u.reshape(n, -1)[:, :k] - offset).to(torch.int16)


# ---- the fragment layout (tensor-core GEMV, triton_mma.py) --------------------------------------------------------
# For 2-, 3- and 4-bit codes. Rows are cut into tiles of 16, K into chunks of 256 / bits codes (128 for 3-bit: the
# 2-bit chunk of its low bits; 16 / bits k16 steps of mma.sync m16n8k16, 8 for 3-bit; K padded with zero codes to
# a whole number of units, max(chunk, group) codes). A tile's chunk is 32 lanes x 4 int32 words, lane-major (one
# coalesced 16-byte load per lane): lane l = 4 g + q holds, for every step s of the chunk, its A-fragment pairs:
# word 2 kk + h, bits [bits s, + bits) and [16 + bits s, + bits), the codes of row 16 tile + 8 h + g at k and
# k + 1, k = chunk start + sub j + 4 (sub / 16) q + 4 s' + 2 kk, where sub = min(group, chunk) codes,
# j = s // (sub / 16) and s' = s % (sub / 16). That order (not the plain one) gives each lane contiguous x in a
# sub-chunk, and keeps every step inside one scale group. Codes are stored unsigned (code + offset).
# 3-bit codes: the chunk's 128 words hold their low two bits as 2-bit codes, and 64 words after them (an 8-byte
# load per lane: words 128 + 2 l + kk) the high bits: that of word 2 kk + h's code at k + e of step s sits at bit
# 16 e + 8 (s // 4) + 4 h + s % 4, where one shift and one mask put it beside the low bits both kernels extract
# (`triton_mma._code_pair`, cuda_frag's byte lanes). 3 bits a weight where 4-bit fields took 4.
# qweight: int32 [cdiv(N, 16), chunks * fragment_chunk_words(bits)].
FRAGMENT_BITS = (2, 3, 4)


def fragment_chunk(bits: int) -> int:
    """Codes a row of a tile has in one chunk of the fragment layout: 256 / bits (3-bit: 128)."""
    return 128 if bits == 3 else 256 // bits


def fragment_chunk_words(bits: int) -> int:
    """int32 words of one tile's chunk: 128 (3-bit: 128 + 64 for the high bits)."""
    return fragment_chunk(bits) * bits // 2


def fragment_unit(bits: int, group: int) -> int:
    """K granularity of the fragment layout: max(chunk, group) codes (`fragment_chunk`)."""
    return max(fragment_chunk(bits), group)


def uses_fragment_layout(spec: IntSpec) -> bool:
    """Whether a format packs into the fragment layout rather than the interleaved one: 4-bit codes with mins in
    groups of 32 (q4_1, q4_k), where the tensor-core kernel measured 6-20% faster per layer and 6-18% faster whole
    frames than the Triton GEMV, or of 16: q3_k's 3-bit codes + 4 with the min 4 times its signed scale (in 4-bit
    fields, 5.25 bits a weight where folded int8 codes took 8.1, it ran batch-1 frames +22% and batch 32 -50% on
    an H100), and q2_k (16-code groups with mins) since its scales and mins are loaded a chunk ahead (H100, per
    layer 91.1 -> 83.5 us, frames 135 -> 145/s: bench/RESULTS.md, sixteenth session). q2 and q4_0 (no mins)
    measured so there too, but take the interleaved layout's CUDA GEMV now (`cuda_int`); q4's 128-code groups
    gained 2%, tq2_0 (256) ran slower. The layout itself takes any group of whole k16 steps."""
    return spec.bits in FRAGMENT_BITS and spec.has_min and spec.group in (16, 32)


def _fragment_view(bits: int, group: int):
    chunk = fragment_chunk(bits)
    sub = min(group, chunk)
    return chunk, sub, sub // 16


def _high_shifts(device) -> torch.Tensor:
    """Bit of the 3-bit codes' high bits [h, step, e] in their word (see the layout notes above)."""
    h, s, e = torch.arange(2)[:, None, None], torch.arange(8)[None, :, None], torch.arange(2)[None, None, :]
    return (16 * e + 8 * (s // 4) + 4 * h + s % 4).to(device)


def pack_fragment_codes(codes: torch.Tensor, bits: int, offset: int, group: int) -> torch.Tensor:
    """Signed codes [N, K] -> qweight int32 [cdiv(N, 16), chunks * fragment_chunk_words(bits)] in the fragment
    layout."""
    n, k = codes.shape
    chunk, sub, sps = _fragment_view(bits, group)
    unit = fragment_unit(bits, group)
    tiles, kp = -(-n // 16), -(-k // unit) * unit
    u = codes.to(torch.int64) + offset
    u = torch.nn.functional.pad(u, (0, kp - k, 0, tiles * 16 - n), value=offset)
    # [tile, h, g, chunk, j, q, s', kk, e] -> [tile, chunk, g, q, kk, h, j, s', e]
    u = u.view(tiles, 2, 8, kp // chunk, chunk // sub, 4, sps, 2, 2).permute(0, 3, 2, 5, 7, 1, 4, 6, 8)
    steps = chunk // 16
    u = u.reshape(*u.shape[:6], steps, 2)  # [tile, chunk, g, q, kk, h, step, e]
    low = 2 if bits == 3 else bits
    sh = (16 * torch.arange(2, device=u.device)[None, :] + low * torch.arange(steps, device=u.device)[:, None])
    words = ((u & ((1 << low) - 1)) << sh).sum(dim=(-2, -1))  # [tile, chunk, g, q, kk, h]
    words = words.reshape(tiles, kp // chunk, 128)
    if bits == 3:
        high = (((u >> 2) & 1) << _high_shifts(u.device)).sum(dim=(-3, -2, -1))  # [tile, chunk, g, q, kk]
        words = torch.cat([words, high.reshape(tiles, kp // chunk, 64)], dim=2)
    return _to_int32(words).reshape(tiles, -1).contiguous()


def unpack_fragment_codes(qweight: torch.Tensor, bits: int, offset: int, k: int, n: int, group: int) -> torch.Tensor:
    """Inverse of `pack_fragment_codes` -> signed codes int16 [n, k]."""
    tiles = qweight.shape[0]
    chunk, sub, sps = _fragment_view(bits, group)
    steps = chunk // 16
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).view(tiles, -1, fragment_chunk_words(bits))
    low = 2 if bits == 3 else bits
    sh = (16 * torch.arange(2, device=words.device)[None, :] + low * torch.arange(steps, device=words.device)[:, None])
    lw = words[:, :, :128].reshape(tiles, -1, 8, 4, 2, 2)  # [tile, chunk, g, q, kk, h]
    u = (lw[..., None, None] >> sh) & ((1 << low) - 1)  # [tile, chunk, g, q, kk, h, step, e]
    if bits == 3:
        hw = words[:, :, 128:].reshape(tiles, -1, 8, 4, 2)  # [tile, chunk, g, q, kk]
        u = u | (((hw[..., None, None, None] >> _high_shifts(words.device)) & 1) << 2)
    u = u.reshape(*u.shape[:6], chunk // sub, sps, 2)  # [tile, chunk, g, q, kk, h, j, s', e]
    u = u.permute(0, 5, 2, 1, 6, 3, 7, 4, 8).reshape(tiles * 16, -1)  # -> [tile, h, g, chunk, j, q, s', kk, e]
    return (u[:n, :k] - offset).to(torch.int16)


def dequantize_packed_fragment(bits: int, offset: int, group: int, qweight: torch.Tensor, scales: torch.Tensor,
                               k: int, dtype: torch.dtype = torch.float32,
                               mins: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight [R, k] of a fragment-layout qweight with its scales (and mins) [R, groups] (R: the
    scales' rows): scale * code (- min)."""
    n = scales.shape[0]
    codes = unpack_fragment_codes(qweight, bits, offset, k, n, group).to(torch.float32)
    w = codes * scales.repeat_interleave(group, dim=1)[:, :k]
    if mins is not None:
        w = w - mins.repeat_interleave(group, dim=1)[:, :k]
    return w.to(dtype)


# ---- the grouped row-major layout ----------------------------------------------------------------------------------
# 8-bit codes that fit a signed byte (q8_0, q5_0, q5_1, q5_k, q6_k) stay a plain row-major int8 [N, K]
# matrix with fp32 scales (and mins) [N, K / group], read by the float GEMV (`triton_float`), as q8 is: per layer
# at S2's shapes on an H200 (`scripts/probe_rowmajor8.py`) q8_0 took 42.4 us against 50.7 in the interleaved
# layout's dp2a kernel, q6_k 46.0 against 80.8, q5_k 48.4 against 58.5. Codes that fit a byte only negated
# would be stored as -code with -scale (`row_major_sign`).
def row_major_sign(spec: IntSpec) -> int:
    """1 where a format's codes fit a signed byte, -1 where their negations do (stored as -code with -scale), 0
    where neither does."""
    if spec.code_min >= -128 and spec.code_max <= 127:
        return 1
    return -1 if -spec.code_max >= -128 and -spec.code_min <= 127 else 0


def uses_row_major_layout(spec: IntSpec) -> bool:
    """Whether a format's codes stay a row-major int8 matrix (see above) rather than the interleaved layout."""
    return spec.bits == 8 and row_major_sign(spec) != 0


def _pad_groups(s: torch.Tensor, n_groups: int) -> torch.Tensor:
    s = s.to(torch.float32)
    if s.shape[1] != n_groups:
        s = torch.nn.functional.pad(s, (0, n_groups - s.shape[1]))
    return s.contiguous()


def repack_int(fmt: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> dict:
    """Pack one integer format for the kernels.

    codes: integer [N, K] in the format's signed range (`INT_SPECS[fmt]`); scales: float [N, K // group]; mins:
    float [N, K // group], only for asymmetric formats (q4_k, q4_1, ...). Or, for K-quants with mins, their two
    levels (`IntegerCodes.two_level`): scales int16 [N, K // group] (sc | m << 8) with mins float32
    [N, K // 256, 2] ((d, dmin) per super-block). The fragment layout (q2_k, q4_k) keeps those, and the
    tensor-core kernel forms d * sc and dmin * m itself: per layer on an H100 (`scripts/probe_kq.py`) q2_k 84.8 ->
    59.1 us, q4_k 53.8 -> 49.0; whole frames q2_k +24% (H200), q4_k +5% on an H100 but -0.5% on an H200, and
    q4_k's batch 32 -4% (bench/RESULTS.md, sixteenth session). The other layouts expand them to float32 per
    group.
    Returns {"qweight": int32 [padded_rows(N), padded_k(K) * bits // 32] (rows interleaved, see above; the
    fragment layout's [cdiv(N, 16), chunks * 128] where `uses_fragment_layout`),
    "scales": float32 [N, padded K // group]}
    (+ "mins", same shape as scales); where `uses_row_major_layout`: {"weight": int8 [N, K] (the codes times
    `row_major_sign`), "scales": float32 [N, K // group] (times the same sign)} (+ "mins"); two levels kept in the
    fragment layout: "scales" int16 and "mins" the (d, dmin) pairs, as given. A format whose files hold fp16 scales
    (`IntSpec.half_scales`: q4_0) keeps them fp16 in the interleaved layout where they are fp16 values (0.5 bits
    a weight less to read at 32 codes a scale). Scales stay fp32 otherwise: at
    4-bit g128 they add 6% to the bytes (fp16 would save 3%; fp16 group scales also ran slower in the row-major
    GEMV), and fp32 keeps the kernels exactly equal to the reference dequantization.
    """
    spec = INT_SPECS.get(fmt)
    if spec is None:
        raise QuantFormatError(f"no integer kernel format {fmt!r}; known: {', '.join(INT_SPECS)}")
    _check_codes(fmt, codes, spec)
    n, k = codes.shape
    if scales.dtype == torch.int16:  # two levels: sub-block bytes and (d, dmin) per super-block
        if tuple(scales.shape) != (n, k // spec.group):
            raise QuantFormatError(f"repack_{fmt}: scales must have shape {(n, k // spec.group)}, got "
                                   f"{tuple(scales.shape)}")
        if not spec.has_min or mins is None or mins.dim() != 3 or mins.shape[0] != n or mins.shape[2] != 2 \
                or mins.shape[1] == 0 or scales.shape[1] % mins.shape[1]:
            raise QuantFormatError(f"repack_{fmt}: two-level scales need a format with mins and (d, dmin) pairs "
                                   f"[N, super-blocks, 2], got {None if mins is None else tuple(mins.shape)}")
        if spec.bits == 3:  # Q3_K's form, which cuda_frag's 3-bit path assumes: min 4 sc, dmin = d
            v = scales.to(torch.int32)
            if not (torch.equal(v >> 8, 4 * ((v << 24) >> 24)) and torch.equal(mins[..., 0], mins[..., 1])):
                raise QuantFormatError(f"repack_{fmt}: two-level scales must have the min 4 sc and dmin = d")
        if uses_fragment_layout(spec) and k % 256 == 0:  # whole super-blocks: whole units (64 or 128 codes)
            return {"qweight": pack_fragment_codes(codes, spec.bits, spec.offset, spec.group),
                    "scales": scales.contiguous(), "mins": mins.to(torch.float32).contiguous()}
        scales, mins = two_level_scales(scales, mins)
    _check_scales(fmt, "scales", scales, (n, k // spec.group))
    if uses_row_major_layout(spec):
        kp, sign = k, row_major_sign(spec)
        out = {"weight": (codes.to(torch.int16) * sign).to(torch.int8).contiguous()}
        scales = scales.to(torch.float32) * sign
    elif uses_fragment_layout(spec):
        unit = fragment_unit(spec.bits, spec.group)
        kp = -(-k // unit) * unit
        out = {"qweight": pack_fragment_codes(codes, spec.bits, spec.offset, spec.group)}
    else:
        kp = padded_k(k)
        out = {"qweight": pack_int_codes(codes, spec.bits, spec.offset)}
    out["scales"] = _pad_groups(scales, kp // spec.group)
    if spec.half_scales and "qweight" in out and not uses_fragment_layout(spec):
        half = out["scales"].to(torch.float16)  # a scale per 32 codes: 0.5 bits a weight fewer than fp32
        if torch.equal(half.to(torch.float32), out["scales"]):
            out["scales"] = half
    if spec.has_min:
        if mins is None:
            raise QuantFormatError(f"repack_{fmt}: this asymmetric format needs mins [N, K // {spec.group}]")
        _check_scales(fmt, "mins", mins, (n, k // spec.group))
        out["mins"] = _pad_groups(mins, kp // spec.group)
    elif mins is not None:
        raise QuantFormatError(f"repack_{fmt}: symmetric format takes no mins")
    return out


def repack_fp8(codes: torch.Tensor, scales: torch.Tensor) -> dict:
    """fp8: codes float8_e4m3fn [N, K], scales float [N] -> {"weight": e4m3 [N, K], "scales": fp32 [N]}."""
    if codes.dim() != 2 or codes.dtype != torch.float8_e4m3fn:
        raise QuantFormatError(f"repack_fp8: codes must be float8_e4m3fn [N, K], got {codes.dtype} {tuple(codes.shape)}")
    _check_scales("fp8", "scales", scales.reshape(-1), (codes.shape[0],))
    return {"weight": codes.contiguous(), "scales": scales.reshape(-1).to(torch.float32).contiguous()}


def repack_bf16(weight: torch.Tensor, scales: torch.Tensor | None = None) -> dict:
    """bf16 (the unquantized baseline): weight float [N, K] -> {"weight": bf16 [N, K]}; scales must be None."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise QuantFormatError(f"repack_bf16: weight must be a float [N, K] tensor, got {weight.dtype} {tuple(weight.shape)}")
    if scales is not None:
        raise QuantFormatError("repack_bf16: bf16 weights take no scales")
    return {"weight": weight.to(torch.bfloat16).contiguous()}


def repack_q8(codes: torch.Tensor, scales: torch.Tensor) -> dict:
    """q8: integer codes [N, K] in [-127, 127], scales float [N] -> {"weight": int8 [N, K], "scales": fp32 [N]}.

    Row-major like fp8, not the integer layout: at one byte per weight the float GEMV, which turns four codes into
    floats with two byte permutes and two half2 subtractions, read a layer at S2's shapes in 38 us on an H200
    against 52 us for the integer layout's kernel (bench/RESULTS.md, tenth session)."""
    if codes.dim() != 2 or codes.dtype.is_floating_point:
        raise QuantFormatError(f"repack_q8: codes must be an integer [N, K] tensor, got {codes.dtype} "
                               f"{tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -127 or int(codes.max()) > 127):
        raise QuantFormatError(f"repack_q8: codes outside [-127, 127] (min {int(codes.min())}, max {int(codes.max())})")
    flat = scales.reshape(-1)
    _check_scales("q8", "scales", flat, (codes.shape[0],))
    return {"weight": codes.to(torch.int8).contiguous(), "scales": flat.to(torch.float32).contiguous()}


def repack_q4(codes, scales):
    """q4: codes [N, K] in [-7, 7], scales [N, K / 128]. See `repack_int`."""
    return repack_int("q4", codes, scales)


def repack_q3(codes, scales):
    """q3: codes [N, K] in [-3, 3], scales [N, K / 128]. See `repack_int`."""
    return repack_int("q3", codes, scales)


def repack_q2(codes, scales):
    """q2: codes [N, K] in {-1, 0, 1}, scales [N, K / 64]. See `repack_int`."""
    return repack_int("q2", codes, scales)


def repack_q8_0(codes, scales):
    """ggml q8_0: int8 codes [N, K], scales (fp16 in the file) [N, K / 32]. See `repack_int`."""
    return repack_int("q8_0", codes, scales)


def repack_q4_0(codes, scales):
    """ggml q4_0: codes [N, K] in [-8, 7], scales [N, K / 32]. See `repack_int`."""
    return repack_int("q4_0", codes, scales)


def repack_q4_k(codes, scales, mins=None):
    """ggml Q4_K decoded to codes 0..15 [N, K], per-32 scales and mins [N, K / 32]: w = scale * code - min."""
    return repack_int("q4_k", codes, scales, mins)


# every integer format packs through repack_int (repack_q4 & co. above are its named forms)
REPACK = {**{fmt: partial(repack_int, fmt) for fmt in INT_SPECS}, "fp8": repack_fp8, "q8": repack_q8,
          "bf16": repack_bf16}


def cat_rows(a: dict, b: dict) -> dict:
    """Stack two packed weights of one format along N (e.g. w1 over w3 for the fused gate/up kernel). Each tensor
    is stacked on its own dim 0, so the halves of every joined tensor are its first and second half."""
    if a.keys() != b.keys():
        raise QuantFormatError(f"cat_rows: packed weights differ in layout ({sorted(a)} vs {sorted(b)})")
    return {name: torch.cat([a[name], b[name]], dim=0).contiguous() for name in a}


def split_rows(joined: dict) -> tuple[dict, dict]:
    """The two halves of a `cat_rows` result (views: every tensor's first and second half along dim 0)."""
    return tuple({name: t[i * (t.shape[0] // 2): (i + 1) * (t.shape[0] // 2)] for name, t in joined.items()}
                 for i in (0, 1))


def dequantize_packed(fmt: str, packed: dict, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, k] a packed dict stands for (reference and CPU fallback; materializes the matrix).
    N is the scales' row count (an integer qweight has padded_rows(N) storage rows); not for cat_rows output."""
    if fmt == "bf16":
        return packed["weight"].to(dtype)
    if fmt in ("fp8", "q8"):
        return (packed["weight"].to(torch.float32) * packed["scales"][:, None]).to(dtype)
    spec = INT_SPECS.get(fmt)
    if spec is None:
        raise QuantFormatError(f"no kernel format {fmt!r}; known: {', '.join(REPACK)}")
    if uses_fragment_layout(spec):
        scales, mins = packed["scales"], packed.get("mins")
        if scales.dtype == torch.int16:
            scales, mins = two_level_scales(scales, mins)
        return dequantize_packed_fragment(spec.bits, spec.offset, spec.group, packed["qweight"], scales, k, dtype,
                                          mins)
    if uses_row_major_layout(spec):
        codes = packed["weight"][:, :k].to(torch.float32)
    else:
        codes = unpack_int_codes(packed["qweight"], spec.bits, spec.offset, k, packed["scales"].shape[0])
        codes = codes.to(torch.float32)
    s = packed["scales"].to(torch.float32).repeat_interleave(spec.group, dim=1)[:, :k]
    w = codes * s
    if spec.has_min:
        w = w - packed["mins"].repeat_interleave(spec.group, dim=1)[:, :k]
    return w.to(dtype)
