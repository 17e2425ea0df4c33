"""Q4_K, ggml's 4.5-bit K-quant: 256-weight super-blocks of 8 sub-blocks of 32, w = d*sc*q - dmin*m, q in [0, 15].

Block (144 bytes): d fp16, dmin fp16, scales[12] (6-bit sc and m per sub-block, see `pack_scales_mins_k4`),
qs[128]: byte 32*c + l holds weight 64*c + l in its low nibble and weight 64*c + 32 + l in its high nibble.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from s2conv.quant_formats._kquant import (
    KQuantFormat, columns, half_np, half_torch, make_qkx2_quants, pack_scales_mins_k4, requantize, sum0,
    unpack_scales_mins_k4, unpack_scales_mins_k4_torch,
)


class Q4K(KQuantFormat, name="q4_k"):
    ggml_type = GGMLQuantizationType.Q4_K
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1]
    code_group = 32

    def _quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        n_blocks = x.shape[0]
        xs = columns(x, 32)
        av_x = np.sqrt(sum0(xs * xs) / np.float32(32))
        weights = np.abs(xs) + av_x  # favours the large weights of a sub-block
        scales, mins, L = make_qkx2_quants(xs, weights, 15, -1.0, 0.1, 20, use_mad=False)
        d, dmin, ls, lm, packed = pack_scales_mins_k4(scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8))
        sub_d = d.astype(np.float32)[:, None] * ls
        sub_m = dmin.astype(np.float32)[:, None] * lm
        L = requantize(x, sub_d, sub_m, 0, 15, L, 8).astype(np.uint8)
        L = L.reshape(n_blocks, 4, 2, 32)
        qs = L[:, :, 0] | (L[:, :, 1] << 4)
        return np.concatenate([
            d.view(np.uint8).reshape(n_blocks, 2), dmin.view(np.uint8).reshape(n_blocks, 2), packed,
            qs.reshape(n_blocks, 128),
        ], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d, dmin = half_np(blocks[:, 0:2]), half_np(blocks[:, 2:4])
        sc, m = unpack_scales_mins_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
        return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1, 256)

    def _sub_scales_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return half_torch(blocks[:, 0:2]), half_torch(blocks[:, 2:4]), *unpack_scales_mins_k4_torch(blocks[:, 4:16])

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, dmin, sc, m = self._sub_scales_blocks(blocks)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32), d * sc, dmin * m
