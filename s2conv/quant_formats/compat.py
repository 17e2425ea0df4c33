"""Exact ggml equivalents of S2 formats: q4 and q3 as Q4_0, q8 as Q8_0 (fp8 and q2 have none in gguf-py 0.19).

The compat bytes reuse the S2 codes and round each group's float32 scale to float16, repeated over the 32-weight
ggml blocks of the group. Any ggml reader then decodes code * fp16(scale) bit for bit: numerically identical to
the S2 tensor quantized with `fp16_scales=True` (whose scales are already float16 values).
"""
from __future__ import annotations

import logging

import numpy as np
from gguf import GGMLQuantizationType

from s2conv.errors import QuantFormatError
from s2conv.quant_formats._groupwise import FP16_MAX, GroupwiseFormat
from s2conv.quant_formats.base import get_format

log = logging.getLogger(__name__)

_COMPAT: dict[str, GGMLQuantizationType] = {
    "q4": GGMLQuantizationType.Q4_0,
    "q3": GGMLQuantizationType.Q4_0,
    "q8": GGMLQuantizationType.Q8_0,
}
GGML_BLOCK = 32  # weights per Q4_0 / Q8_0 block
FP16_MIN_NORMAL = 6.103515625e-05  # 2**-14: smaller fp16 scales are subnormal and lose relative precision


def compat_type(fmt_name: str) -> GGMLQuantizationType | None:
    """The ggml type that stores S2 format `fmt_name` exactly (up to fp16 scales), or None."""
    return _COMPAT.get(fmt_name.lower())


def to_compat(fmt_name: str, data: np.ndarray, n_cols: int, tensor: str = "tensor") -> np.ndarray:
    """Re-encode S2 rows as ggml blocks.

    data: (rows, row_bytes) uint8 in format `fmt_name`. Returns (rows, n_cols // 32 * block_bytes) uint8 in the
    ggml layout of `compat_type(fmt_name)`:
      Q4_0 (18 bytes per 32 weights): d (fp16 LE) | qs[16], qs[j] = (c[j] + 8) | (c[j + 16] + 8) << 4
      Q8_0 (34 bytes per 32 weights): d (fp16 LE) | qs[32] int8 = c
    with d = fp16(scale of the S2 group or row holding the block). `gguf.quants.dequantize(out, type)` equals
    codes * fp16(scale) exactly. Raises QuantFormatError when the format has no compat type, a row length is not
    a multiple of 32, or a scale exceeds the float16 range (65504).
    """
    qtype = compat_type(fmt_name)
    if qtype is None:
        raise QuantFormatError(f"{tensor}: format {fmt_name!r} has no ggml equivalent; known: {sorted(_COMPAT)}")
    if n_cols % GGML_BLOCK:
        raise QuantFormatError(f"{tensor}: row length {n_cols} is not a multiple of {GGML_BLOCK} "
                               f"required by {qtype.name}")
    fmt = get_format(fmt_name)
    assert isinstance(fmt, GroupwiseFormat)  # guaranteed by _COMPAT
    scales, codes = fmt._unpack(data, n_cols)  # (rows, groups) float32, (rows, n_cols) float32
    rows = codes.shape[0]
    if scales.size and float(scales.max()) > FP16_MAX:
        raise QuantFormatError(f"{tensor}: scale {float(scales.max()):g} of format {fmt_name!r} exceeds the "
                               f"float16 maximum {FP16_MAX:g}; no {qtype.name} equivalent")
    n_sub = np.count_nonzero((scales > 0) & (scales < FP16_MIN_NORMAL))
    if n_sub:
        log.warning("%s: %d group scales below 6.1e-5 become float16 subnormals in %s (precision loss)",
                    tensor, n_sub, qtype.name)
    blocks_per_group = fmt._group(n_cols) // GGML_BLOCK
    d = np.repeat(scales.astype("<f2"), blocks_per_group, axis=1)  # (rows, n_cols // 32)
    d = d.reshape(rows, -1, 1).view(np.uint8)  # (rows, nblk, 2) little-endian fp16 bytes
    c = codes.reshape(rows, -1, GGML_BLOCK)
    if qtype == GGMLQuantizationType.Q8_0:
        qs = c.astype(np.int8).view(np.uint8)
    else:
        u = (c + 8).astype(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << np.uint8(4))
    return np.concatenate([d, qs], axis=2).reshape(rows, -1)
