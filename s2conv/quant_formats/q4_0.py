"""ggml Q4_0: blocks of 32 weights as one float16 scale and 32 4-bit values (4.5 bits per weight).

Block layout (18 bytes): d (f16) | qs[16]; byte j holds q[j] (low nibble) and q[j+16] (high nibble).
w[j] = d * (q[j] - 8), with d = m / -8 where m is the block's value of largest magnitude (so m decodes exactly
as q = 0) and q = min(15, trunc(w / d + 8.5)).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.quant_formats.ggml_common import (GGMLFormat, f16_from_bytes, pack_nibbles, safe_inverse,
                                              signed_absmax, unpack_nibbles)


class Q4_0(GGMLFormat, name="q4_0"):
    ggml_type = GGMLQuantizationType.Q4_0
    code_group = 32

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        m = signed_absmax(blocks)
        self._require_finite(m, tensor=tensor)
        d = m / np.float32(-8)
        out = np.empty((blocks.shape[0], self.type_size), dtype=np.uint8)
        out[:, :2] = self._scale_bits(d, tensor)
        # Separate multiply and add (no fused multiply-add), as gguf-py computes it.
        v = blocks * safe_inverse(d)
        v += np.float32(8.5)
        q = np.minimum(v.astype(np.uint8), np.uint8(15))  # v >= 0.5 here; the cast truncates
        out[:, 2:] = pack_nibbles(q)
        return out

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        q = unpack_nibbles(blocks[:, 2:]).to(torch.int8) - 8
        return q[:, None], f16_from_bytes(blocks[:, :2]), None
