"""The plain float ggml types: F32, F16 and BF16 (one element per "block").

F16 rounds to nearest even (numpy's astype, GGML_FP32_TO_FP16); BF16 rounds like ggml_compute_fp32_to_bf16
(nearest even on the top 16 bits, NaN forced quiet). All three reject NaN/Inf input and values that would
round to Inf, like the quantized types.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.errors import QuantFormatError
from s2conv.quant_formats.ggml_common import GGMLFormat


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 array of bfloat16 bit patterns, exactly as ggml_compute_fp32_to_bf16."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if is_nan.any():  # keep sign and top mantissa bits, set the quiet bit
        n = np.where(is_nan, (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
    # Round to nearest even: add 0x7FFF plus the lowest kept bit. No uint32 overflow: the largest non-NaN
    # pattern, 0xFF800000 (-Inf), plus 0x8000 still fits.
    return ((n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)


class _FloatFormat(GGMLFormat):
    lossless = True  # exact for every value representable in the format's own dtype

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """(n, 1) float32 -> (n, 1) array of the storage dtype."""
        raise NotImplementedError

    def _all_finite(self, enc: np.ndarray) -> bool:
        return bool(np.isfinite(enc).all())

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        self._require_finite(blocks, tensor=tensor)
        with np.errstate(over="ignore"):
            enc = self._encode(blocks)
        if not self._all_finite(enc):
            raise QuantFormatError(
                f"{tensor}: magnitude {np.abs(blocks).max():.6g} overflows format {self.name!r}"
            )
        return enc.view(np.uint8)


class F32(_FloatFormat, name="f32"):
    ggml_type = GGMLQuantizationType.F32

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return x

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32)


class F16(_FloatFormat, name="f16"):
    ggml_type = GGMLQuantizationType.F16

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16)

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).to(torch.float32)


class BF16(_FloatFormat, name="bf16"):
    ggml_type = GGMLQuantizationType.BF16

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return fp32_to_bf16_bits(x)

    def _all_finite(self, enc: np.ndarray) -> bool:
        return not ((enc & np.uint16(0x7F80)) == np.uint16(0x7F80)).any()  # exponent all ones: Inf or NaN

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
