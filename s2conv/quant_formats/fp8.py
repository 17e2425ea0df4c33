"""fp8: per-row symmetric float8 e4m3fn with one float32 scale per output row (8 + 32/cols bits per weight).

Row layout: scale (float32 LE, 4 bytes) | codes (cols x float8 e4m3fn bytes); w[j] = float(codes[j]) * scale,
scale = absmax(row) / 448. "search" is the same as "rtn": e4m3's error is relative, so clipping the row maximum
does not lower the row's squared error (measured on heavy-tailed rows).
"""
from __future__ import annotations

import numpy as np
import torch

from s2conv.quant_formats._groupwise import GroupwiseFormat, _multiplier, _real_scales, scratch

FP8_MAX = 448.0  # largest finite e4m3fn value; 0x7F / 0xFF (NaN) are never written
# e4m3fn byte -> float32 value, decoded by torch once (bit-exact with the torch path below)
_LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


class FP8(GroupwiseFormat, name="fp8"):
    block_size = 1
    type_size = 1
    row_overhead = 4
    group_size = None
    qmax = FP8_MAX

    def _code_bytes(self, g: int) -> int:
        return g

    def _scales_and_codes(self, w: torch.Tensor, method: str, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = scratch("x", w.shape)
        a = torch.abs(w, out=x).amax(dim=1)
        a_safe = torch.where(a > 0, a, 1.0)
        s = _real_scales(a, FP8_MAX, fp16)
        c = _multiplier(a_safe, s)[:, None] if fp16 else FP8_MAX
        # w / scale computed as (w / absmax) * (absmax / scale): no overflow for huge rows, <= 448 up to rounding
        torch.div(w, a_safe[:, None], out=x).mul_(c)
        return s, x.clamp_(-FP8_MAX, FP8_MAX)

    def _encode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float8_e4m3fn).view(torch.uint8)  # round to nearest even

    def _decode_np(self, packed: np.ndarray, g: int) -> np.ndarray:
        return _LUT[packed]

    def _decode_torch(self, packed: torch.Tensor, g: int) -> torch.Tensor:
        return packed.contiguous().view(torch.float8_e4m3fn).to(torch.float32)
