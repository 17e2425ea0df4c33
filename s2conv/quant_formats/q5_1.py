"""ggml Q5_1: blocks of 32 weights as float16 scale and minimum and 32 5-bit values (6 bits per weight).

Block layout (24 bytes): d (f16) | m (f16) | qh (4 bytes: bit j = bit 4 of q[j]) | qs[16] (low nibbles).
w[j] = d * q[j] + m, with m = block min, d = (max - min) / 31, q = min(31, trunc((w - min) / d + 0.5)).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.quant_formats.ggml_common import (GGMLFormat, block_min_max, f16_from_bytes, pack_bits, pack_nibbles,
                                              safe_inverse, unpack_5bit)


class Q5_1(GGMLFormat, name="q5_1"):
    ggml_type = GGMLQuantizationType.Q5_1
    code_group = 32

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        lo, hi = block_min_max(blocks)
        self._require_finite(lo, hi, tensor=tensor)
        d = (hi - lo) / np.float32(31)
        out = np.empty((blocks.shape[0], self.type_size), dtype=np.uint8)
        out[:, :2] = self._scale_bits(d, tensor)
        out[:, 2:4] = self._scale_bits(lo, tensor, "minimum")
        v = blocks - lo
        v *= safe_inverse(d)
        v += np.float32(0.5)
        q = np.minimum(v.astype(np.uint8), np.uint8(31))
        out[:, 4:8] = pack_bits(q >> np.uint8(4))
        out[:, 8:] = pack_nibbles(q & np.uint8(15))
        return out

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # w = d * q + m, as scale * code - min with min = -m (the same float32 result)
        q = unpack_5bit(blocks[:, 4:8], blocks[:, 8:])
        return q[:, None], f16_from_bytes(blocks[:, :2]), -f16_from_bytes(blocks[:, 2:4])
