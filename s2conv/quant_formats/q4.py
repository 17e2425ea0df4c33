"""q4: group-wise symmetric INT4, groups of 128 input columns, codes in [-7, 7] (4.25 bits per weight).

Block (68 bytes): scale (float32 LE) | qs[64]; qs[j] = (c[j] + 8) | (c[j + 64] + 8) << 4; w = c * scale.
"""
from __future__ import annotations

import numpy as np
import torch

from s2conv.quant_formats._groupwise import GroupwiseFormat, pack_fields, unpack_fields_np, unpack_fields_torch

OFFSET = 8  # stored nibble = code + 8, as in ggml Q4_0 (value = (nibble - 8) * d)


class Q4(GroupwiseFormat, name="q4"):
    block_size = 128
    type_size = 4 + 64
    group_size = 128
    qmax = 7
    clip_ratios = (1.0, 0.9, 0.8, 0.7)

    def _code_bytes(self, g: int) -> int:
        return g // 2

    def _encode(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_fields((codes + OFFSET).to(torch.uint8), 4)

    def _decode_np(self, packed: np.ndarray, g: int) -> np.ndarray:
        return unpack_fields_np(packed, 4).astype(np.float32) - OFFSET

    def _decode_torch(self, packed: torch.Tensor, g: int) -> torch.Tensor:
        return unpack_fields_torch(packed, 4).to(torch.float32) - OFFSET
