"""ggml Q4_1: blocks of 32 weights as a float16 scale, a float16 minimum and 32 4-bit values (5 bits per weight).

Block layout (20 bytes): d (f16) | m (f16) | qs[16]; byte j holds q[j] (low nibble) and q[j+16] (high nibble).
w[j] = d * q[j] + m, with m = block min, d = (max - min) / 15, q = min(15, trunc((w - min) / d + 0.5)).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.quant_formats.ggml_common import (GGMLFormat, block_min_max, f16_from_bytes, pack_nibbles, safe_inverse,
                                              unpack_nibbles)


class Q4_1(GGMLFormat, name="q4_1"):
    ggml_type = GGMLQuantizationType.Q4_1
    code_group = 32

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        lo, hi = block_min_max(blocks)
        self._require_finite(lo, hi, tensor=tensor)
        d = (hi - lo) / np.float32(15)
        out = np.empty((blocks.shape[0], self.type_size), dtype=np.uint8)
        out[:, :2] = self._scale_bits(d, tensor)
        out[:, 2:4] = self._scale_bits(lo, tensor, "minimum")
        v = blocks - lo
        v *= safe_inverse(d)
        v += np.float32(0.5)
        out[:, 4:] = pack_nibbles(np.minimum(v.astype(np.uint8), np.uint8(15)))
        return out

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # w = d * q + m, as scale * code - min with min = -m (the same float32 result)
        return unpack_nibbles(blocks[:, 4:])[:, None], f16_from_bytes(blocks[:, :2]), -f16_from_bytes(blocks[:, 2:4])
