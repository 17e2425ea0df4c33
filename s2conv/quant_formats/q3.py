"""q3: group-wise symmetric INT3, groups of 128 input columns, codes in [-3, 3] (3.25 bits per weight).

Block (52 bytes): scale (float32 LE) | lo[32] | hi[16], with u = c + 4 in [1, 7]:
lo[j] = sum_k (u[j + 32k] & 3) << 2k (k = 0..3), hi[j] = sum_k (u[j + 16k] >> 2) << k (k = 0..7); w = c * scale.
"""
from __future__ import annotations

import numpy as np
import torch

from s2conv.quant_formats._groupwise import GroupwiseFormat, pack_fields, unpack_fields_np, unpack_fields_torch

OFFSET = 4  # stored 3-bit value = code + 4


class Q3(GroupwiseFormat, name="q3"):
    block_size = 128
    type_size = 4 + 32 + 16
    group_size = 128
    qmax = 3
    clip_ratios = (1.0, 0.85, 0.7, 0.55)

    def _code_bytes(self, g: int) -> int:
        return g // 4 + g // 8

    def _encode(self, codes: torch.Tensor) -> torch.Tensor:
        u = (codes + OFFSET).to(torch.uint8)
        return torch.cat([pack_fields(u & 3, 2), pack_fields(u >> 2, 1)], dim=1)

    def _decode_np(self, packed: np.ndarray, g: int) -> np.ndarray:
        lo = unpack_fields_np(packed[:, : g // 4], 2)
        hi = unpack_fields_np(packed[:, g // 4:], 1)
        return (lo | (hi << np.uint8(2))).astype(np.float32) - OFFSET

    def _decode_torch(self, packed: torch.Tensor, g: int) -> torch.Tensor:
        lo = unpack_fields_torch(packed[:, : g // 4], 2)
        hi = unpack_fields_torch(packed[:, g // 4:], 1)
        return (lo | (hi << 2)).to(torch.float32) - OFFSET
