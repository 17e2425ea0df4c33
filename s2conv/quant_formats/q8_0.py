"""ggml Q8_0: blocks of 32 weights as one float16 scale and 32 int8 values (8.5 bits per weight).

Block layout (34 bytes): d (f16) | qs[32] (int8); w[j] = d * qs[j], d = amax / 127, qs = roundf(w / d).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.quant_formats.ggml_common import GGMLFormat, absmax, f16_from_bytes, roundf_int8, safe_inverse


class Q8_0(GGMLFormat, name="q8_0"):
    ggml_type = GGMLQuantizationType.Q8_0
    code_group = 32

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        a = np.abs(blocks)
        amax = absmax(a)
        self._require_finite(amax, tensor=tensor)
        d = amax / np.float32(127)
        out = np.empty((blocks.shape[0], self.type_size), dtype=np.uint8)
        out[:, :2] = self._scale_bits(d, tensor)
        a *= safe_inverse(d)  # |w| * id == |w * id|: round the magnitudes, then restore the signs
        out[:, 2:] = roundf_int8(a, np.signbit(blocks)).view(np.uint8)
        return out

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return blocks[:, None, 2:].view(torch.int8), f16_from_bytes(blocks[:, :2]), None
