"""ggml Q5_0: blocks of 32 weights as one float16 scale and 32 5-bit values (5.5 bits per weight).

Block layout (22 bytes): d (f16) | qh (4 bytes: bit j = bit 4 of q[j]) | qs[16] (low nibbles, q[j] and q[j+16]
in byte j). w[j] = d * (q[j] - 16), d = m / -16 for the largest-magnitude value m, q = min(31, trunc(w/d + 16.5)).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.quant_formats.ggml_common import (GGMLFormat, f16_from_bytes, pack_bits, pack_nibbles, safe_inverse,
                                              signed_absmax, unpack_5bit)


class Q5_0(GGMLFormat, name="q5_0"):
    ggml_type = GGMLQuantizationType.Q5_0
    code_group = 32

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        m = signed_absmax(blocks)
        self._require_finite(m, tensor=tensor)
        d = m / np.float32(-16)
        out = np.empty((blocks.shape[0], self.type_size), dtype=np.uint8)
        out[:, :2] = self._scale_bits(d, tensor)
        v = blocks * safe_inverse(d)
        v += np.float32(16.5)
        q = np.minimum(v.astype(np.uint8), np.uint8(31))
        out[:, 2:6] = pack_bits(q >> np.uint8(4))
        out[:, 6:] = pack_nibbles(q & np.uint8(15))
        return out

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        q = unpack_5bit(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
        return q[:, None], f16_from_bytes(blocks[:, :2]), None
