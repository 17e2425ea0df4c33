"""q8: per-row symmetric INT8, codes in [-127, 127], one float32 scale per output row (8 + 32/cols bits per weight).

Row layout: scale (float32 LE, 4 bytes) | codes (cols x int8, two's complement); w[j] = codes[j] * scale.
"""
from __future__ import annotations

import numpy as np
import torch

from s2conv.quant_formats._groupwise import GroupwiseFormat


class Q8(GroupwiseFormat, name="q8"):
    block_size = 1
    type_size = 1
    row_overhead = 4
    group_size = None
    qmax = 127
    # With 255 levels per row, clipping gains nothing measurable on heavy-tailed rows (relative RMSE 0.0375 at every
    # ratio tried): "search" is absmax plus the least-squares refit of the row scale.
    clip_ratios = (1.0,)

    def _code_bytes(self, g: int) -> int:
        return g

    def _encode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int8).view(torch.uint8)

    def _decode_np(self, packed: np.ndarray, g: int) -> np.ndarray:
        return packed.view(np.int8).astype(np.float32)

    def _decode_torch(self, packed: torch.Tensor, g: int) -> torch.Tensor:
        return packed.contiguous().view(torch.int8).to(torch.float32)
