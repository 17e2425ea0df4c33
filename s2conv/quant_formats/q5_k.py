"""Q5_K, ggml's 5.5-bit K-quant: 256-weight super-blocks of 8 sub-blocks of 32, w = d*sc*q - dmin*m, q in [0, 31].

Block (176 bytes): d fp16, dmin fp16, scales[12] (as Q4_K), qh[32]: bit k of byte l is the high bit of weight
32*k + l, qs[128]: the low 4 bits, packed like Q4_K's nibbles.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from s2conv.quant_formats._kquant import (
    KQuantFormat, bits_np, bits_torch, columns, half_np, half_torch, make_qkx2_quants, pack_scales_mins_k4,
    requantize, sum0, unpack_scales_mins_k4, unpack_scales_mins_k4_torch,
)

_BIT_WEIGHTS = (1 << np.arange(8, dtype=np.uint8))[None, :, None]


class Q5K(KQuantFormat, name="q5_k"):
    ggml_type = GGMLQuantizationType.Q5_K
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K][1]
    code_group = 32

    def _quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        n_blocks = x.shape[0]
        xs = columns(x, 32)
        av_x = np.sqrt(sum0(xs * xs) / np.float32(32))
        weights = np.abs(xs) + av_x
        scales, mins, L = make_qkx2_quants(xs, weights, 31, -0.5, 0.1, 15, use_mad=False)
        d, dmin, ls, lm, packed = pack_scales_mins_k4(scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8))
        sub_d = d.astype(np.float32)[:, None] * ls
        sub_m = dmin.astype(np.float32)[:, None] * lm
        L = requantize(x, sub_d, sub_m, 0, 31, L, 8).astype(np.uint8)
        qh = np.bitwise_or.reduce((L >> 4) * _BIT_WEIGHTS, axis=1)  # (B, 32)
        low = (L & 0xF).reshape(n_blocks, 4, 2, 32)
        qs = low[:, :, 0] | (low[:, :, 1] << 4)
        return np.concatenate([
            d.view(np.uint8).reshape(n_blocks, 2), dmin.view(np.uint8).reshape(n_blocks, 2), packed, qh,
            qs.reshape(n_blocks, 128),
        ], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d, dmin = half_np(blocks[:, 0:2]), half_np(blocks[:, 2:4])
        sc, m = unpack_scales_mins_k4(blocks[:, 4:16])
        high = bits_np(blocks[:, 16:48], 1)  # (B, 8, 32)
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
        low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
        q = (low | (high << 4)).astype(np.float32)
        return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(-1, 256)

    def _sub_scales_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return half_torch(blocks[:, 0:2]), half_torch(blocks[:, 2:4]), *unpack_scales_mins_k4_torch(blocks[:, 4:16])

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, dmin, sc, m = self._sub_scales_blocks(blocks)
        high = bits_torch(blocks[:, 16:48], 1)
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
        low = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)
        return low | (high << 4), d * sc, dmin * m
