"""Fused GEMV/GEMM kernels vs `x @ dequant(W).T` in fp32; on CPU through triton's interpreter (small shapes)."""
from __future__ import annotations

import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.quant_formats.base import two_level_scales  # noqa: E402
from s2conv.errors import QuantFormatError, RuntimeModelError  # noqa: E402
from s2conv.runtime import kernels  # noqa: E402
from s2conv.runtime.kernels import (  # noqa: E402
    FLOAT_FORMATS, GATED_KERNELS, INT_SPECS, KERNELS, REPACK, cat_rows, dequantize_packed,
)
from s2conv.runtime.kernels import cuda_int, layout, ops  # noqa: E402


FORMATS = list(INT_SPECS) + list(FLOAT_FORMATS)
# Per output dtype: one rounding step of the output. bf16 keeps 8 significant bits: 2**-8 relative with
# round-to-nearest (GPU), 2**-7 because triton's CPU interpreter truncates fp32 -> bf16; fp16 keeps 11 bits;
# fp32 output only differs from the reference by summation order. Elementwise: |y - ref| <= RTOL * |ref| + 1e-5 * max|ref|, where
# the absolute part covers fp32 summation-order noise on outputs near zero. A wrong slot, group or offset gives
# errors of the order of |ref| itself.
RTOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-5}


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple:
    """Random repack arguments of a format: every code value of the range, varied scales per group."""
    if fmt == "bf16":
        return (torch.randn(n, k, generator=gen),)
    if fmt == "fp8":
        return (torch.randn(n, k, generator=gen).to(torch.float8_e4m3fn), torch.rand(n, generator=gen) + 0.5)
    if fmt == "q8":  # every code of [-127, 127], including both ends (the byte flip must not wrap)
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16)
        codes[0, :2] = torch.tensor([-127, 127])
        return codes, torch.rand(n, generator=gen) * 0.1 + 0.01
    spec = INT_SPECS[fmt]
    if spec.group and k % spec.group:
        pytest.skip(f"{fmt} stores K in whole groups of {spec.group}; K = {k} is not one")
    codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), generator=gen, dtype=torch.int16)
    shape = (n, k // spec.group) if spec.group else (n,)
    scales = torch.rand(shape, generator=gen) * 0.1 + 0.01
    if spec.half_scales:  # fp16 in the file (q4_0): the interleaved layout keeps them so
        scales = scales.half().float()
    if spec.has_min:
        return codes, scales, torch.rand(shape, generator=gen) * 0.1
    return codes, scales


def make_two_level(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple:
    """Random repack arguments of a K-quant with mins in its two levels: codes, scale and min bytes (sc | m << 8,
    every value up to 63; q3_k: signed sc in [-32, 31] with m = 4 sc, and dmin = d, as its file gives them) and
    (d, dmin) per 256 columns, fp16 values as in a file."""
    codes = make_weight(fmt, n, k, gen)[0]
    groups = k // INT_SPECS[fmt].group
    sup = (torch.rand(n, k // 256, 2, generator=gen) * 0.004 + 0.001).half().float()
    if fmt == "q3_k":
        sc = torch.randint(-32, 32, (n, groups), generator=gen, dtype=torch.int16)
        sc[0, :2] = torch.tensor([-32, 31])  # both ends: the sign extensions must hold
        m = 4 * sc
        sup[..., 1] = sup[..., 0]
    else:
        sc, m = (torch.randint(0, 64, (n, groups), generator=gen, dtype=torch.int16) for _ in range(2))
    return codes, (sc & 0xFF) | (m << 8), sup


def reference_weight(fmt: str, args: tuple, k: int) -> torch.Tensor:
    """fp32 [N, K] straight from the repack arguments (independent of the packed layout)."""
    if len(args) == 3 and args[1].dtype == torch.int16:  # two-level K-quant scales
        args = (args[0], *two_level_scales(args[1], args[2]))
    if fmt == "bf16":
        return args[0].to(torch.bfloat16).float()
    if fmt in ("fp8", "q8"):
        return args[0].float() * args[1][:, None]
    spec = INT_SPECS[fmt]
    codes = args[0].float()
    if not spec.group:
        return codes * args[1][:, None]
    w = codes * args[1].repeat_interleave(spec.group, dim=1)
    if spec.has_min:
        w = w - args[2].repeat_interleave(spec.group, dim=1)
    return w


def packed_on_device(fmt: str, args: tuple) -> dict:
    return {name: t.to(DEVICE) for name, t in REPACK[fmt](*args).items()}


def linear_impl(fmt: str, x: torch.Tensor, p: dict, gated: bool, cfg=None, **kw) -> torch.Tensor:
    """The implementation KERNELS[fmt] calls for this packed weight, with an explicit launch config: the float
    kernels for float formats and row-major integer ones (`layout.uses_row_major_layout`), else the integer one."""
    spec = INT_SPECS.get(fmt)
    if spec is None:
        return ops.float_linear_impl(x, p["weight"], p.get("scales"), gated, cfg, **kw)
    if layout.uses_row_major_layout(spec):
        return ops.float_linear_impl(x, p["weight"], p["scales"], gated, cfg, group=spec.group, mins=p.get("mins"),
                                     **kw)
    return ops.int_linear_impl(x, p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset, spec.group,
                               gated, cfg, **kw)


def int_dot_error(fmt: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | float:
    """Worst-case |y - ref| [1, N] that the dp2a GEMV (M = 1, bf16/fp16 x, integer formats) adds: each x becomes a
    multiple of max|x| / XMAX, off by at most half of one, so row n is off by at most that times sum_k |w[n, k]|.
    0 where only the float path runs (fp32 x, M > 1, float formats)."""
    spec = INT_SPECS.get(fmt)
    if spec is None or x.shape[0] != 1 or x.dtype == torch.float32:
        return 0.0
    xmax = ops.int_dot_xmax(spec.bits, spec.offset, spec.group)
    if xmax == 0:  # no dp2a form for this format: the float path, exact to fp32 rounding
        return 0.0
    return 0.5 * x.float().abs().max() / xmax * w.abs().sum(dim=1)[None, :]


def gated_error(h1: torch.Tensor, h3: torch.Tensor, e1, e3):
    """How errors e1, e3 of the two halves carry into silu(h1) * h3 (|silu'| <= 1.1)."""
    return 1.1 * e1 * (h3.abs() + e3) + torch.nn.functional.silu(h1).abs() * e3


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, extra=0.0) -> None:
    """|y - ref| within one output rounding (RTOL), fp32 summation noise, and `extra` (a known error budget)."""
    assert y.dtype == dtype and y.shape == ref.shape
    y = y.float().cpu()
    tol = RTOL[dtype] * ref.abs() + 1e-5 * ref.abs().max() + extra
    bad = (y - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outputs off; max err {(y - ref).abs().max():.3g}"


# ---- layout ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(INT_SPECS))
@pytest.mark.parametrize("k", [256, 384, 640, 1024])
def test_repack_roundtrip(fmt, k):
    gen = torch.Generator().manual_seed(k)
    args = make_weight(fmt, 5, k, gen)
    packed = REPACK[fmt](*args)
    spec = INT_SPECS[fmt]
    if layout.uses_row_major_layout(spec):  # q8_0, q5_*, q6_k: int8 codes as they are, row-major
        assert packed["weight"].dtype == torch.int8 and packed["weight"].shape == (5, k)
        assert packed["scales"].shape == (5, k // spec.group)
        codes = packed["weight"].to(torch.int16) * layout.row_major_sign(spec)
    elif layout.uses_fragment_layout(spec):  # q4_1, q4_k, q3_k, q2_k: tiles of 16 rows, chunks of 256 / bits codes
        unit = layout.fragment_unit(spec.bits, spec.group)
        chunks = -(-k // unit) * unit // layout.fragment_chunk(spec.bits)
        # bits * 16 rows * chunk codes a chunk: 128 words for 2- and 4-bit codes, 192 for 3-bit
        words = {2: 128, 3: 192, 4: 128}[spec.bits]
        assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (1, chunks * words)
        codes = layout.unpack_fragment_codes(packed["qweight"], spec.bits, spec.offset, k, 5, spec.group)
    else:
        assert packed["qweight"].shape == (layout.padded_rows(5), layout.padded_k(k) * spec.bits // 32)
        codes = layout.unpack_int_codes(packed["qweight"], spec.bits, spec.offset, k, 5)
    assert torch.equal(codes.long(), args[0].long())
    assert torch.equal(dequantize_packed(fmt, packed, k), reference_weight(fmt, args, k))


def test_fragment_kernel_pads_an_odd_k():
    """x with an odd K (inside the weight's padded K) is read as int32 pairs only after a zero column is added:
    the same result as the reference, at one row and at 9 rows."""
    n, k = 20, 128
    gen = torch.Generator().manual_seed(5)
    args = make_weight("q4_0", n, k, gen)
    p = packed_on_device("q4_0", args)
    w = reference_weight("q4_0", args, k)[:, :k - 1]
    for m in (1, 9):
        x = torch.randn(m, k - 1, generator=gen).to(torch.bfloat16)
        y = ops.int_linear_impl(x.to(DEVICE), p["qweight"], p["scales"], None, 4, 8, 32, False)
        assert_matches(y, x.float() @ w.T, torch.bfloat16)


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 64), (4, 128), (2, 256)])
def test_fragment_bit_positions(bits, group):
    """A single code lands where the fragment layout's notes say: tile, chunk, lane 4 g + q, word 2 kk + h, bit
    bits * step (+ 16 for the pair's second k), with k = chunk start + sub j + 4 (sub / 16) q + 4 s' + 2 kk + e."""
    off = 1 << (bits - 1)
    chunk, sub = 256 // bits, min(group, 256 // bits)
    sps = sub // 16
    tile, h, g, c, j, q, s_, kk, e = 1, 1, 3, 1, chunk // sub - 1, 2, sps - 1, 1, 1
    row = 16 * tile + 8 * h + g
    k_at = c * chunk + sub * j + 4 * sps * q + 4 * s_ + 2 * kk + e
    k = 2 * max(chunk, group)
    codes = torch.zeros(2 * 16, k, dtype=torch.int64)
    codes[row, k_at] = 1
    q_ = layout.pack_fragment_codes(codes, bits, off, group).to(torch.int64) & 0xFFFFFFFF
    empty = layout.pack_fragment_codes(torch.zeros_like(codes), bits, off, group).to(torch.int64) & 0xFFFFFFFF
    diff = (q_ ^ empty).nonzero().tolist()
    lane, word, step = 4 * g + q, 2 * kk + h, j * sps + s_
    assert diff == [[tile, c * 128 + 4 * lane + word]]
    assert ((q_[tile, c * 128 + 4 * lane + word] >> (16 * e + bits * step)) & ((1 << bits) - 1)) == off + 1


@pytest.mark.parametrize("fmt,m,k,gated,residual,split,two_level", [
    ("q4_1", 1, 224, False, False, 2, False), ("q4_1", 9, 384, True, False, 2, False),
    ("q4_1", 1, 384, False, True, 4, False),
    ("q4_k", 1, 384, True, False, 2, False), ("q4_1", 9, 224, False, True, 1, False),
    ("q4_1", 1, 224, False, False, 3, False), ("q2_k", 1, 768, True, False, 3, False),
    ("q2_k", 9, 512, False, True, 1, False), ("q2_k", 1, 512, False, False, 1, True),
    ("q2_k", 9, 768, True, False, 3, True), ("q4_k", 1, 512, True, False, 2, True),
    ("q4_k", 9, 256, False, True, 1, True), ("q3_k", 1, 512, True, False, 2, True),
    ("q3_k", 9, 256, False, True, 1, True), ("q3_k", 17, 512, True, False, 2, True),
    ("q4_1", 16, 224, False, True, 1, False)])
def test_fragment_kernel(fmt, m, k, gated, residual, split, two_level):
    """The tensor-core kernel of the fragment layout (bf16 x, the decode path of the 2- and 4-bit
    formats with mins, q2_k's 16-code groups: a group per k16 step) at one row and at two or three 8-row batch
    tiles (9, 16 and 17 rows), with
    K short of a whole unit (masked x), 37 rows
    (a partial tile), split-K finished in the launch, the gate, the residual add and mins: within one bf16 output
    rounding of the reference. two_level: K-quant scales as the file keeps them (bytes under (d, dmin) per
    256 columns), which the kernel multiplies out itself."""
    n = 37
    gen = torch.Generator().manual_seed(k + m)
    spec = INT_SPECS[fmt]
    assert layout.uses_fragment_layout(spec)
    make = make_two_level if two_level else make_weight
    a1, a3 = make(fmt, n, k, gen), make(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    r = torch.randn(m, n, generator=gen).to(torch.bfloat16) if residual else None
    cfg = ops.Config(block_n=16, split=split, num_warps=2 if m > 1 else 1)
    y = ops.int_linear_impl(x.to(DEVICE), p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset,
                            spec.group, gated, cfg, residual=None if r is None else r.to(DEVICE))
    h1 = x.float() @ reference_weight(fmt, a1, k).T
    if gated:
        ref = torch.nn.functional.silu(h1) * (x.float() @ reference_weight(fmt, a3, k).T)
    else:
        ref = h1 if r is None else (h1.to(torch.bfloat16).float() + r.float())
    # with a residual, x W^T is rounded to bf16 before the add: one bf16 step of |x W^T| either way
    assert_matches(y, ref, torch.bfloat16, 0.0 if r is None else RTOL[torch.bfloat16] * h1.abs())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_slot_planar_bit_positions(bits):
    """A single code lands where the layout docs say: block b, sub-tile, field -> bit 8 * (field % 4) + bits *
    (field // 4), word = k % 16, and rows interleaved in groups of 16 (word j of row r at 16 j + r)."""
    k = 1024
    off = 1 << (bits - 1)
    row = 19  # group 1, row 3 of the group
    codes = torch.zeros(21, k, dtype=torch.int64)
    kk = 512 + 16 * 9 + 5  # block 1, slot 9, word 5
    codes[row, kk] = 1
    q = layout.pack_int_codes(codes, bits, off).view(-1).to(torch.int64) & 0xFFFFFFFF
    empty = layout.pack_int_codes(torch.zeros_like(codes), bits, off).view(-1).to(torch.int64) & 0xFFFFFFFF
    diff = (q ^ empty).nonzero().flatten().tolist()
    words_per_block = 16 * bits
    group_start = 16 * (k // 512) * words_per_block  # words of row group 0
    if bits == 3:  # u = 5 vs 4: only the low plane changes (slot 9 -> sub-tile 0, field 9: byte 1, bits 12..13)
        assert diff == [group_start + 16 * (words_per_block + 5) + 3]
        assert (q ^ empty)[diff[0]] == (1 << 12)
    else:
        per_word = 32 // bits
        assert diff == [group_start + 16 * (words_per_block + 16 * (9 // per_word) + 5) + 3]
        field = 9 % per_word
        shift = 8 * (field % 4) + bits * (field // 4)  # 8- and 4-bit: field 1 at bit 8; 2-bit: field 9 at 12
        assert shift == {8: 8, 4: 8, 2: 12}[bits]
        assert ((q[diff[0]] >> shift) & ((1 << bits) - 1)) == off + 1


def test_q8_repacks_row_major_and_back():
    """q8 keeps its int8 codes row-major (the float kernels read it like fp8); -128 has no place in its range."""
    gen = torch.Generator().manual_seed(4)
    codes, scales = make_weight("q8", 5, 96, gen)
    p = REPACK["q8"](codes, scales)
    assert p["weight"].dtype == torch.int8 and torch.equal(p["weight"].to(torch.int16), codes)
    assert torch.equal(dequantize_packed("q8", p, 96), reference_weight("q8", (codes, scales), 96))
    with pytest.raises(QuantFormatError, match=r"outside \[-127, 127\]"):
        REPACK["q8"](torch.full((2, 32), -128), torch.ones(2))
    with pytest.raises(QuantFormatError, match="scales"):
        REPACK["q8"](codes, torch.ones(4))


@pytest.mark.parametrize("m", [1, 3])
def test_fp16_scales_give_what_fp32_scales_give(m):
    """q4_0's scales are fp16 in its files: its packing keeps them fp16 (0.5 bits a weight less to read) where they
    are fp16 values, fp32 where not, and the kernels give bit for bit what the same values in fp32 give."""
    gen = torch.Generator().manual_seed(m)
    n, k = 48, 1024
    codes, scales = make_weight("q4_0", n, k, gen)
    packed = {name: t.to(DEVICE) for name, t in REPACK["q4_0"](codes, scales).items()}
    assert packed["scales"].dtype == torch.float16
    assert REPACK["q4_0"](codes, scales + 1e-9)["scales"].dtype == torch.float32  # not fp16 values: kept exact
    as_fp32 = dict(packed, scales=packed["scales"].float())
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    assert torch.equal(KERNELS["q4_0"](x, packed), KERNELS["q4_0"](x, as_fp32))
    assert torch.equal(GATED_KERNELS["q4_0"](x, cat_rows(packed, packed)),
                       GATED_KERNELS["q4_0"](x, cat_rows(as_fp32, as_fp32)))
    assert torch.equal(dequantize_packed("q4_0", packed, k), dequantize_packed("q4_0", as_fp32, k))


def test_repack_rejects_bad_input():
    with pytest.raises(QuantFormatError, match=r"outside the format's range \[-7, 7\]"):
        REPACK["q4"](torch.full((2, 128), 8), torch.ones(2, 1))
    with pytest.raises(QuantFormatError, match="scales must have shape"):
        REPACK["q4"](torch.zeros(2, 256, dtype=torch.int8), torch.ones(2, 3))
    with pytest.raises(QuantFormatError, match="multiple of the group size 64"):
        REPACK["q2"](torch.zeros(2, 96, dtype=torch.int8), torch.ones(2, 1))
    with pytest.raises(QuantFormatError, match="needs mins"):
        REPACK["q4_k"](torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 2))
    codes, sub, sup = make_two_level("q3_k", 2, 256, torch.Generator().manual_seed(0))
    REPACK["q3_k"](codes, sub, sup)
    with pytest.raises(QuantFormatError, match="min 4 sc and dmin = d"):  # what the 3-bit CUDA GEMV assumes
        REPACK["q3_k"](codes, sub + (1 << 8), sup)
    with pytest.raises(QuantFormatError, match="min 4 sc and dmin = d"):
        REPACK["q3_k"](codes, sub, sup * torch.tensor([1.0, 2.0]))


# ---- kernels -----------------------------------------------------------------------------------------------------
# Each (format, M) case gets one K and one activation dtype from a rotation, so that every format meets every M,
# every K and every dtype somewhere while the interpreted module stays well under a minute.
_KS = [256, 384, 640]
_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _whole_groups(fmt: str, k: int) -> int:
    """k rounded up to whole scale groups of the format (256-code groups: 384 -> 512, 640 -> 768)."""
    group = INT_SPECS[fmt].group if fmt in INT_SPECS else 0
    return -(-k // group) * group if group else k


CASES = [(fmt, m, _whole_groups(fmt, _KS[(i + j) % 3]), _DTYPES[(i + 2 * j) % 3])
         for i, fmt in enumerate(FORMATS) for j, m in enumerate([1, 3, 17])]


@pytest.mark.parametrize("fmt,m,k,dtype", CASES, ids=[f"{f}-M{m}-K{k}-{str(d)[6:]}" for f, m, k, d in CASES])
def test_kernel_matches_reference(fmt, m, k, dtype):
    n = 37  # odd: not a multiple of any block size
    gen = torch.Generator().manual_seed(hash((fmt, m, k)) % 2**31)
    args = make_weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = KERNELS[fmt](x.to(DEVICE), packed_on_device(fmt, args))
    w = reference_weight(fmt, args, k)
    assert_matches(y, x.float() @ w.T, dtype, int_dot_error(fmt, x, w))


@pytest.mark.parametrize("fmt,m,n", [("q4", 1, 21), ("q3", 1, 21), ("q2", 1, 21), ("q4_k", 1, 21), ("fp8", 1, 21),
                                     ("q8", 3, 21), ("bf16", 3, 21), ("q2_k", 3, 32), ("q4", 5, 48), ("q5_k", 1, 21),
                                     ("q6_k", 3, 32)])
def test_gated_kernel(fmt, m, n):
    """Rows that fill whole 16-row groups (n = 32, 48) take the plain GEMM over w1|w3 and a silu-mul launch at
    M > 1; other rows the gated GEMM."""
    k = 384
    gen = torch.Generator().manual_seed(7)
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    packed = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3))
    x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)  # leading batch dims are flattened and restored
    y = GATED_KERNELS[fmt](x.to(DEVICE), packed)
    h1 = x.float() @ reference_weight(fmt, a1, k).T
    h3 = x.float() @ reference_weight(fmt, a3, k).T
    ref = torch.nn.functional.silu(h1) * h3
    extra = torch.zeros_like(ref)
    if fmt in INT_SPECS and not layout.uses_row_major_layout(INT_SPECS[fmt]) and m > 1 and n % 16 == 0:
        # two launches: h1, h3 and silu(h1) rounded to bf16 as in eager
        r = RTOL[torch.bfloat16]
        extra = gated_error(h1, h3, r * h1.abs(), r * h3.abs()) + r * ref.abs()
    assert y.shape == (2, m, n)
    assert_matches(y.reshape(-1, n), ref.reshape(-1, n), torch.bfloat16, extra.reshape(-1, n))  # 2 m rows: GEMM


@pytest.mark.parametrize("fmt,gated", [("q8_0", False), ("q5_0", True), ("q6_k", False), ("q5_k", True)])
def test_row_major_grouped_formats(fmt, gated, monkeypatch):
    """8-bit codes that fit a byte stay a row-major int8 matrix with a scale (and min) per group,
    read by the float kernels: the GEMV at one row (also with the norm applied from a producer's sum of squares,
    as for q8) and the GEMM at 5 rows, each both ways it can run (GEMV: products summed per group, or codes scaled
    one by one; GEMM: one dot per group, or dequantized tiles in two dots), within one output rounding of the
    reference."""
    spec = INT_SPECS[fmt]
    assert layout.uses_row_major_layout(spec) and KERNELS[fmt].takes_norm_ss and not KERNELS[fmt].takes_rs_in
    n, k = 21, 512
    gen = torch.Generator().manual_seed(len(fmt))
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    assert p["weight"].dtype == torch.int8 and "qweight" not in p
    launcher = (GATED_KERNELS if gated else KERNELS)[fmt]

    def reference(x):
        h1 = x.float() @ reference_weight(fmt, a1, k).T
        return torch.nn.functional.silu(h1) * (x.float() @ reference_weight(fmt, a3, k).T) if gated else h1

    for m in (1, 5):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        runs = [launcher(x.to(DEVICE), p)]
        # the other form: the GEMM's dequantized tiles (or dots per group), the GEMV's codes scaled one by one
        other_sum = "grouped" if spec.has_min else "scaled"
        switch = ("S2CONV_GROUP_DOT", "0") if m > 1 else ("S2CONV_GROUP_SUM", other_sum)
        monkeypatch.setenv(*switch)
        runs.append(launcher(x.to(DEVICE), p))
        monkeypatch.delenv(switch[0])
        # the custom op (what a torch.compile'd model calls) takes the group and the mins too
        runs.append(torch.ops.s2conv.float_linear(x.to(DEVICE), p["weight"], p["scales"], gated, None, spec.group,
                                                  p.get("mins")))
        for y in runs:
            assert_matches(y, reference(x), torch.bfloat16)
    g = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16)
    x = (torch.randn(1, k, generator=gen) * 3).to(torch.bfloat16)
    normed = ((x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
              * g).to(torch.bfloat16)
    y = launcher(x.to(DEVICE), p, norm_ss=(x.float().pow(2).sum().reshape(1).to(DEVICE), g.to(DEVICE), 1e-6))
    ref = reference(normed)
    # x normalised in the kernel may land one bf16 step away from the eager norm's rounding: one step of x, summed
    assert (y.float().cpu() - ref).abs().max() <= 2**-6 * ref.abs().max()


@pytest.mark.parametrize("fmt,m", [("q4", 1), ("q3", 3), ("bf16", 1), ("fp8", 3), ("q5_k", 1), ("q6_k", 3)])
def test_split_k_equals_single_pass(fmt, m):
    """The two-kernel split-K path and the one-kernel path compute the same numbers (fp32 output)."""
    n, k = 19, 1536
    gen = torch.Generator().manual_seed(3)
    args = make_weight(fmt, n, k, gen)
    p = packed_on_device(fmt, args)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    runs = []
    for split in (1, 3):
        cfg = ops.Config(block_n=16, split=split, block_k=128)
        runs.append(linear_impl(fmt, x, p, False, cfg))
    # equal up to fp32 summation order (GPUs reorder the tensor-core sums: ~1e-6 of the largest output)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5 * float(runs[0].abs().max()))
    assert_matches(runs[1], x.cpu() @ reference_weight(fmt, args, k).T, torch.float32)


@pytest.mark.parametrize("fmt,gated", [("q8", False), ("q4", True), ("q3", False), ("q2", True), ("q8_0", False),
                                       ("q4_k", True), ("q3_k", True), ("q2_k", False), ("q6_k", True),
                                       ("q5_k", False), ("tq2_0", True), ("bf16", True), ("fp8", False)])
def test_gemv_multi_block_programs_and_one_launch_split(fmt, gated):
    """M = 1 with several 512-code blocks (float formats: 128-column steps) per program (the prefetch chain) and
    split-K finished inside the one launch by the last-arriving program; a second call checks that the arrival
    counters were reset to zero."""
    n, k = 11, 1536  # 3 blocks: split 1 -> one program runs 3, split 2 -> 2 + 1
    gen = torch.Generator().manual_seed(11)
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    h1 = reference_weight(fmt, a1, k)
    for split, calls in ((1, 1), (2, 2), (5, 2)):
        # float formats: the plain loop, then the asynchronous-copy pipeline (the default config's)
        cfg = ops.Config(block_n=8, split=split, block_k=128, pipeline=3 if split == 5 else 0)
        for _ in range(calls):
            x = torch.randn(1, k, generator=gen)
            y = linear_impl(fmt, x.to(DEVICE), p, gated, cfg)
            ref = x @ h1.T
            if gated:
                ref = torch.nn.functional.silu(ref) * (x @ reference_weight(fmt, a3, k).T)
            assert_matches(y, ref, torch.float32)


INT_DOT_CASES = [("q4", 4, 1, False), ("q4", 4, 2, True), ("q4", 1, 3, False), ("q3", 1, 2, True),
                 ("q2", 1, 1, True), ("q4_0", 4, 3, False), ("q4_k", 1, 2, True), ("tq2_0", 1, 2, True),
                 ("tq2_0", 1, 1, False)]


@pytest.mark.parametrize("fmt,slices,split,gated", INT_DOT_CASES)
def test_int_dot_gemv(fmt, slices, split, gated):
    """The dp2a GEMV path (x as 16-bit integers) for every format, 1 and 4 row slices, several blocks per program
    (the prefetch chain), split-K finished in the launch, gated, a K that ends inside a block, a residual: within
    its error budget of the reference. A second call with an outlier in x (one element 1000x the rest) checks that
    the x scale follows the data."""
    n, k = 21, _whole_groups(fmt, 1408)  # 3 blocks, the last one partial (11 groups of 128; 256-code groups: 1536)
    gen = torch.Generator().manual_seed(hash((fmt, slices, split)) % 2**31)
    spec = INT_SPECS[fmt]
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    w1, w3 = reference_weight(fmt, a1, k), reference_weight(fmt, a3, k)
    for outlier in (False, True):
        x = torch.randn(1, k, generator=gen)
        if outlier:
            x[0, 777] = 1000.0
        x = x.to(torch.bfloat16)
        r = None if gated else torch.randn(1, n, generator=gen).to(torch.bfloat16)
        cfg = ops.Config(block_n=16, split=split, num_warps=4, num_stages=1, int_dot=True, slices=slices)
        y = ops.int_linear_impl(x.to(DEVICE), p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset,
                                spec.group, gated, cfg, residual=None if r is None else r.to(DEVICE))
        h1 = x.float() @ w1.T
        e1 = int_dot_error(fmt, x, w1)
        if gated:
            h3 = x.float() @ w3.T
            ref, extra = torch.nn.functional.silu(h1) * h3, gated_error(h1, h3, e1, int_dot_error(fmt, x, w3))
        else:
            ref, extra = h1, e1
        # the epilogue rounds x W^T to bf16, adds the residual in fp32 and rounds again (eager `h + linear(x)`):
        # the first rounding may land one bf16 step of |x W^T| away from the reference's, whatever the sum's size
        ref_out = ref if r is None else (ref.to(torch.bfloat16).float() + r.float())
        slack = 0.0 if r is None else RTOL[torch.bfloat16] * ref.abs()
        assert_matches(y, ref_out, torch.bfloat16, extra + slack)


@pytest.mark.parametrize("fmt,split,gated", [("q4", 2, False), ("q3", 2, True), ("tq2_0", 2, False)])
def test_int_dot_unrolled_blocks_equal_the_loop(fmt, split, gated, monkeypatch):
    """The dp2a GEMV with its blocks in straight-line code (`ops.idp_unroll`) gives the same bits as its loop,
    including a program whose last unrolled block is past the end of its K range (3 blocks in splits of 2), and
    with 4 row slices (q4), 3-bit codes and gated weights."""
    n, k = 21, _whole_groups(fmt, 1408)
    gen = torch.Generator().manual_seed(len(fmt) + split)
    spec = INT_SPECS[fmt]
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    cfg = ops.Config(block_n=16, split=split, num_warps=4, num_stages=1, int_dot=True, slices=4 if fmt == "q4" else 1)
    per = -(-3 // split)
    assert ops.idp_unroll(per, split, gated) == per > 1

    def run():
        return ops.int_linear_impl(x, p["qweight"], p["scales"], None, spec.bits, spec.offset, spec.group, gated, cfg)

    unrolled = run()
    monkeypatch.setenv("S2CONV_IDP_UNROLL", "0")
    assert ops.idp_unroll(per, split, gated) == 1
    assert torch.equal(unrolled, run())


@pytest.mark.parametrize("fmt,m,gated", [("q4", 1, False), ("q3", 1, True), ("q2", 1, False), ("q4", 1, True),
                                         ("q4_k", 1, False), ("q4", 3, True)])
def test_norm_folded_into_the_linear(fmt, m, gated, monkeypatch):
    """KERNELS[fmt](x, p, norm=(g, eps)) = rms_norm(x) W^T: folded into the GEMV where `fuses_norm` says so (one row,
    dp2a path, no mins, not the fragment layout: the kernel multiplies the unrounded x * g and scales by the rsqrt,
    so it matches the exact norm within the dp2a path's budget), else fish-speech's norm (rounded to bf16) first."""
    n, k = 19, 1408
    gen = torch.Generator().manual_seed(13)
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16)
    g = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16)
    launcher = (GATED_KERNELS if gated else KERNELS)[fmt]
    spec = INT_SPECS[fmt]
    on_cuda_gemv = (not layout.uses_fragment_layout(spec)  # the CUDA GEMV reads the interleaved layout; folds it always
                    and cuda_int.takes(x.to(DEVICE), spec.bits, spec.group, spec.has_min, k, gated))
    assert launcher.fuses_norm(x.to(DEVICE), p) == on_cuda_gemv  # else opt-in
    monkeypatch.setenv("S2CONV_FOLD_NORM", "1")
    # q4_k: mins; q4_0: the tensor-core kernel of the fragment layout takes no norm
    fused = m == 1 and fmt != "q4_k" and not layout.uses_fragment_layout(INT_SPECS[fmt])
    assert launcher.fuses_norm(x.to(DEVICE), p) == fused
    y = launcher(x.to(DEVICE), p, norm=(g.to(DEVICE), 1e-6)).float().cpu()
    if fused:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * g.float()
    else:
        # fish-speech's RMSNorm: normalise in fp32, round to bf16, scale by the weight in bf16
        normed = ((x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
                  * g).float()
    w1, w3 = reference_weight(fmt, a1, k), reference_weight(fmt, a3, k)
    e1 = int_dot_error(fmt, normed.to(torch.bfloat16), w1) if fused else 0.0
    h1 = normed @ w1.T
    if gated:
        h3 = normed @ w3.T
        e3 = int_dot_error(fmt, normed.to(torch.bfloat16), w3) if fused else 0.0
        ref, extra = torch.nn.functional.silu(h1) * h3, gated_error(h1, h3, e1, e3)
    else:
        ref, extra = h1, e1
    assert_matches(y.to(torch.bfloat16), ref, torch.bfloat16, extra)
    # the norm really is applied: without it the output is far off
    assert (launcher(x.to(DEVICE), p).float().cpu() - ref).abs().max() > 10 * (y - ref).abs().max()


@pytest.mark.parametrize("scale", [0.0, 1e-36, 1e-20, 1e20])
def test_int_dot_gemv_extreme_activation_scales(scale):
    """x of all zeros, below fp32's reach for XMAX / max|x| (1e-36), tiny and huge: finite outputs, as close to the
    reference as the dp2a budget allows (zeros for the first two)."""
    n, k = 21, 512
    gen = torch.Generator().manual_seed(17)
    args = make_weight("q4", n, k, gen)
    w = reference_weight("q4", args, k)
    x = (torch.randn(1, k, generator=gen) * scale).to(torch.bfloat16)  # bf16 reaches 1e-38 .. 3e38
    cfg = ops.Config(block_n=16, split=1, num_warps=4, num_stages=1, int_dot=True, slices=4)
    p = packed_on_device("q4", args)
    y = ops.int_linear_impl(x.to(DEVICE), p["qweight"], p["scales"], None, 4, 8, 128, False, cfg).double().cpu()
    assert torch.isfinite(y).all()
    ref = x.double() @ w.double().T
    assert ((y - ref).abs() <= 2.0**-7 * ref.abs() + 1e-3 * ref.abs().max() + 1e-30).all()
    if scale < 1e-30:
        assert (y == 0).all()


def test_int_dot_xmax_respects_the_integer_ranges():
    """XMAX keeps every integer the dp2a path forms exact: a window's sum of (code - offset) * xi below 2**22 (the
    float bias trick)."""
    for spec in INT_SPECS.values():
        fields = 16 if spec.bits == 3 else 32 // spec.bits
        dev = max(spec.offset, 2**spec.bits - 1 - spec.offset)
        xmax = ops.int_dot_xmax(spec.bits, spec.offset, spec.group)
        assert xmax == 0 or 4095 <= xmax <= 32767
        windows, per_window = ops.scale_windows(spec.bits, spec.group)
        if per_window < 2 or windows > 4:  # 16-code groups: no dp2a form, the float path
            assert xmax == 0
            continue
        span = dev * min(spec.group // 16, fields)
        assert xmax * span < 2**22
        assert xmax == 32767 or (2 * xmax + 1) * span >= 2**22  # the finest x the bound allows
    assert ops.int_dot_xmax(8, 128, 32) == 16383  # 8-bit codes, offset 128: a 16-code window of bytes up to 128


@pytest.mark.parametrize("fmt", ["q8", "q4", "q4_k", "q5_k", "fp8", "bf16"])  # per-row, grouped, with mins (also
# row-major), float
def test_residual_epilogue_equals_a_separate_add(fmt):
    """residual + x W^T from the kernel's epilogue is the eager `h + linear(x)`: at M = 1 (GEMV) and M = 3 (GEMM),
    with and without split-K (the last-arriving program or the reduction kernel adds the residual). fp32: within a
    few ulps (the GPU compiler may contract the per-row scale and the add into one FMA); bf16: within one rounding
    of the sum."""
    n, k = 21, 640  # two 512-code blocks: split 2 gives each program one
    gen = torch.Generator().manual_seed(5)
    p = packed_on_device(fmt, make_weight(fmt, n, k, gen))
    for m, split, dtype in ((1, 1, torch.float32), (1, 2, torch.float32), (3, 1, torch.float32),
                            (3, 2, torch.bfloat16)):
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
        r = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE) * 10
        cfg = ops.Config(block_n=16, split=split, block_k=128)
        plain, fused_add = linear_impl(fmt, x, p, False, cfg), linear_impl(fmt, x, p, False, cfg, residual=r)
        want = (plain.float() + r.float()).to(dtype)
        if dtype == torch.float32:
            # an FMA skips the product's rounding: half an ulp of the product, whatever the sum's size
            atol = 2.0**-23 * plain.abs().max().item()
            torch.testing.assert_close(fused_add, want, rtol=2.0**-22, atol=atol, msg=str((m, split)))
        else:
            torch.testing.assert_close(fused_add.float(), want.float(), rtol=2.0**-7, atol=0)
        assert (fused_add.float() - plain.float()).abs().max() > 1.0  # the residual really was added
    with pytest.raises(RuntimeModelError, match="residual must be"):
        KERNELS[fmt](x, p, residual=r[:, :5])


def test_launcher_errors_name_the_problem(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    p = packed_on_device("q4", make_weight("q4", 8, 256, gen))
    x = torch.randn(1, 256, device=DEVICE)
    with pytest.raises(RuntimeModelError, match=r"K \(columns of x\) must be in \(0, 512\]"):
        KERNELS["q4"](torch.randn(1, 1024, device=DEVICE), p)
    with pytest.raises(RuntimeModelError, match="x dtype must be bfloat16, float16 or float32"):
        KERNELS["q4"](x.to(torch.float64), p)
    with pytest.raises(RuntimeModelError, match="contiguous along K"):
        torch.ops.s2conv.int_linear(torch.randn(256, 2, device=DEVICE).T, p["qweight"], p["scales"], None,
                                    4, 8, 128, False)
    with pytest.raises(RuntimeModelError, match="scales shape must be"):
        torch.ops.s2conv.int_linear(x, p["qweight"], p["scales"][:, :1].contiguous(), None, 4, 8, 128, False)
    # the interleaved layout's kernels read no mins and no 8-bit codes (those formats have other layouts)
    with pytest.raises(RuntimeModelError, match="no mins and scale groups of 32 codes or more"):
        ops.int_linear_impl(x, p["qweight"], p["scales"], p["scales"], 3, 0, 128, False)
    with pytest.raises(RuntimeModelError, match="bits must be 2, 3 or 4"):
        ops.int_linear_impl(x, p["qweight"], p["scales"], None, 8, 128, 128, False)
    monkeypatch.setenv("S2CONV_FOLD_NORM", "1")  # where a norm weight would reach the folding test first
    for norm in (None, torch.ones(256, device=DEVICE)):  # a group the kernels have no form for: one scale per row
        with pytest.raises(RuntimeModelError, match=r"group must be one of \(16, 32"):
            ops.int_linear_impl(x.to(torch.bfloat16), p["qweight"], p["scales"][:, 0].contiguous(), None, 4, 8, 0,
                                False, norm_weight=norm if norm is None else norm.to(torch.bfloat16), norm_eps=1e-6)
    with pytest.raises(RuntimeModelError, match="weight dtype must be float8_e4m3fn, int8 or bfloat16"):
        KERNELS["bf16"](x, {"weight": torch.zeros(4, 256, device=DEVICE)})


def test_registry_and_fake_shapes():
    assert set(KERNELS) == set(GATED_KERNELS) == set(REPACK)
    assert kernels.KERNELS is KERNELS
    # register_fake: shape propagation without running a kernel (what torch.compile sees)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 512, dtype=torch.bfloat16)
        q = torch.empty(10, 64 * 4, dtype=torch.int32)
        s = torch.empty(10, 4, dtype=torch.float32)
        assert torch.ops.s2conv.int_linear(x, q, s, None, 4, 8, 128, True).shape == (3, 5)
        w = torch.empty(6, 512, dtype=torch.bfloat16)
        assert torch.ops.s2conv.float_linear(x, w, None, False).shape == (3, 6)
        codes, s8 = torch.empty(12, 512, dtype=torch.int8), torch.empty(12, 16, dtype=torch.float32)
        assert torch.ops.s2conv.float_linear(x, codes, s8, True, None, 32, s8).shape == (3, 6)


# ---- GPU only ----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
def test_s2_shape_and_cuda_graph(fmt):
    """S2's w2 shape (N=2560, K=9728) at M=1 and 16, eager and replayed from a CUDA graph."""
    n, k = 2560, 9728
    gen = torch.Generator().manual_seed(1)
    args = make_weight(fmt, n, k, gen)
    p = packed_on_device(fmt, args)
    ref_w = reference_weight(fmt, args, k).cuda()
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = KERNELS[fmt](x, p)
        assert_matches(y, (x.float() @ ref_w.T).cpu(), torch.bfloat16, int_dot_error(fmt, x.cpu(), ref_w.cpu()))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = KERNELS[fmt](x, p)
        x.copy_(torch.randn_like(x))
        g.replay()
        assert_matches(yg, (x.float() @ ref_w.T).cpu(), torch.bfloat16, int_dot_error(fmt, x.cpu(), ref_w.cpu()))


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "q8", "q8_0", "q4", "q2_k"])
def test_norm_chain_arguments(fmt):
    """One row: ss_out receives the sum of squares of what the launch stores (residual included, split-K's last
    program too), zero is reset; float kernels take norm_ss = (ss, g, eps) and then equal fish-speech's RMSNorm
    (rounded to bf16 twice) followed by the plain GEMV (up to a rounding flip of x from the order of the sum of
    squares, far below one bf16 step of the output). Several rows are refused."""
    n, k = 37, 1024
    gen = torch.Generator().manual_seed(21)
    p = packed_on_device(fmt, make_weight(fmt, n, k, gen))
    x = (torch.randn(1, k, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    r = torch.randn(1, n, generator=gen).to(torch.bfloat16).to(DEVICE)
    ss, zero = torch.zeros(1, device=DEVICE), torch.full((1,), 5.0, device=DEVICE)
    h = KERNELS[fmt](x, p, residual=r, ss_out=ss, zero=zero)
    assert torch.equal(h, KERNELS[fmt](x, p, residual=r))
    assert float(zero) == 0.0
    assert abs(float(ss) - float(h.float().pow(2).sum())) <= 1e-5 * float(ss)
    if getattr(KERNELS[fmt], "takes_norm_ss", False):
        g = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
        sx = x.float().pow(2).sum().reshape(1)
        y = KERNELS[fmt](x, p, norm_ss=(sx, g, 1e-6))
        from s2conv.runtime.kernels import fused
        want = KERNELS[fmt](fused.rms_norm(x, g, 1e-6), p).float()
        assert float((y.float() - want).abs().max()) <= 2**-8 * float(want.abs().max())
        assert float((KERNELS[fmt](x, p, norm_ss=(2 * sx, g, 1e-6)).float() - want).abs().max()) > 0.1 * float(
            want.abs().max())  # the statistic is read, not recomputed
    with pytest.raises(RuntimeModelError, match="rows of x with a norm chain"):
        KERNELS[fmt](torch.cat([x, x]), p, ss_out=ss)


@pytest.mark.parametrize("fmt,gated,split", [("q4", True, 2), ("q2", True, 3), ("q4_k", False, 1), ("q3", False, 2)])
def test_integer_kernels_take_the_norm_from_their_producer(fmt, gated, split):
    """The one-row norm chain of the integer kernels: a producer (any kernel, here bf16 and the format itself)
    stores h, h * g (gx_out, rounded to h's dtype) and the sum of squares of h; an integer GEMV given h * g and
    rs_in = (ss, eps) scales its output by rsqrt(ss / K + eps) (before the gate) and equals the GEMV of
    fish-speech's RMSNorm(h) within the rounding of x (one bf16 step of x, summed)."""
    from s2conv.runtime.kernels import fused
    n, k = 37, 256
    gen = torch.Generator().manual_seed(5 + split)
    spec = INT_SPECS[fmt]
    a1, a3 = make_weight(fmt, n, k, gen), make_weight(fmt, n, k, gen)
    p = cat_rows(packed_on_device(fmt, a1), packed_on_device(fmt, a3)) if gated else packed_on_device(fmt, a1)
    prod = packed_on_device(fmt, make_weight(fmt, k, 256, gen))  # the producer: N = k
    x = (torch.randn(1, 256, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    r = torch.randn(1, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    g = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    for producer in ("bf16", fmt):
        ss, hg = torch.zeros(1, device=DEVICE), torch.full((1, k), 7.0, dtype=torch.bfloat16, device=DEVICE)
        if producer == "bf16":
            w = torch.randn(k, 256, generator=gen).to(torch.bfloat16).to(DEVICE) * 0.05
            h = KERNELS["bf16"](x, {"weight": w}, residual=r, ss_out=ss, gx_out=(g, hg))
        else:
            h = KERNELS[fmt](x, prod, residual=r, ss_out=ss, gx_out=(g, hg))
        # every column written, rounded once (the interpreter truncates fp32 -> bf16: within one bf16 step there)
        exact = (h.float() * g.float()).to(torch.bfloat16)
        assert bool(((hg.float() - exact.float()).abs() <= exact.float().abs() * 2**-7).all())
        cfg = ops.Config(block_n=16, split=split, num_warps=4, num_stages=1, int_dot=True,
                         slices=4 if fmt == "q4" else 1)
        y = ops.int_linear_impl(hg, p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset, spec.group,
                                gated, cfg, rs_in=(ss, 1e-6))
        n_h = fused.rms_norm(h, g, 1e-6)
        want = ops.int_linear_impl(n_h, p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset,
                                   spec.group, gated, cfg).float()
        assert float((y.float() - want).abs().max()) <= 2**-6 * float(want.abs().max()), producer
        # the statistic is read: twice the sum of squares scales the output by 1 / sqrt(2) (before the gate)
        y2 = ops.int_linear_impl(hg, p["qweight"], p["scales"], p.get("mins"), spec.bits, spec.offset, spec.group,
                                 gated, cfg, rs_in=(2 * ss, 1e-6)).float()
        assert float((y2 - want).abs().max()) > 0.1 * float(want.abs().max())
    with pytest.raises(RuntimeModelError, match="gx_out"):
        KERNELS[fmt](x, prod, gx_out=(g[:-1], hg[:, :-1].contiguous()))
