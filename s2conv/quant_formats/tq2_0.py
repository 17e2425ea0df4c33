"""ggml TQ2_0: ternary weights, blocks of 256 as 2-bit codes and one float16 scale (2.06 bits per weight).

Block layout (66 bytes): qs[64] | d (f16). Code c = roundf(w / d) + 1 in {0, 1, 2}, d = block absmax;
w = d * (c - 1). In each 128-weight half h, byte 32h + m holds weights 128h + 32n + m at bits 2n (n = 0..3).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.quant_formats.ggml_common import GGMLFormat, absmax, f16_from_bytes, roundf_int8, safe_inverse


class TQ2_0(GGMLFormat, name="tq2_0"):
    ggml_type = GGMLQuantizationType.TQ2_0
    code_group = 256

    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        nb = blocks.shape[0]
        a = np.abs(blocks)
        d = absmax(a)
        self._require_finite(d, tensor=tensor)
        out = np.empty((nb, self.type_size), dtype=np.uint8)
        out[:, 64:] = self._scale_bits(d, tensor)
        a *= safe_inverse(d)
        c = (roundf_int8(a, np.signbit(blocks)) + np.int8(1)).view(np.uint8).reshape(nb, 2, 4, 32)
        out[:, :64] = (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(nb, 64)
        return out

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        nb = blocks.shape[0]
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
        c = (blocks[:, :64].reshape(nb, 2, 1, 32) >> shifts) & 3  # (nb, half, n, m)
        return c.reshape(nb, 1, 256).to(torch.int8) - 1, f16_from_bytes(blocks[:, 64:]), None
