"""q2: group-wise symmetric ternary INT2, groups of 64 input columns, codes in {-1, 0, 1} (2.5 bits per weight).

Block (20 bytes): scale (float32 LE) | qs[16]; qs[j] = sum_k (c[j + 16k] + 2) << 2k (k = 0..3); w = c * scale.
"""
from __future__ import annotations

import numpy as np
import torch

from s2conv.quant_formats._groupwise import GroupwiseFormat, pack_fields, unpack_fields_np, unpack_fields_torch

OFFSET = 2  # stored 2-bit value = code + 2 (1, 2 or 3; 0 is never written)


class Q2(GroupwiseFormat, name="q2"):
    block_size = 64
    type_size = 4 + 16
    group_size = 64
    qmax = 1
    # The ternary threshold is scale / 2; for bell-shaped groups the best one lies near 0.25-0.35 x absmax, so the
    # grid reaches down to a ratio of 0.3; the least-squares refit then fine-tunes it.
    clip_ratios = (1.0, 0.8, 0.6, 0.45, 0.3)

    def _code_bytes(self, g: int) -> int:
        return g // 4

    def _encode(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_fields((codes + OFFSET).to(torch.uint8), 2)

    def _decode_np(self, packed: np.ndarray, g: int) -> np.ndarray:
        return unpack_fields_np(packed, 2).astype(np.float32) - OFFSET

    def _decode_torch(self, packed: torch.Tensor, g: int) -> torch.Tensor:
        return unpack_fields_torch(packed, 2).to(torch.float32) - OFFSET
