"""Q6_K, ggml's 6.5625-bit K-quant: 256-weight super-blocks of 16 sub-blocks of 16, w = d*sc*(q - 32), q in [0, 63].

Block (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d fp16. In each half h of 128
weights, weight 128*h + 32*r + l (r = 0..3, l = 0..31) keeps its low bits in ql[64*h + 32*(r % 2) + l] (nibble r // 2)
and its high bits in qh[32*h + l] (bits 2r, 2r+1).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from s2conv.quant_formats._kquant import (
    GROUP_MAX_EPS, KQuantFormat, abs_max, bits_np, bits_torch, columns, fp16, half_np, half_torch, make_qx_quants,
    nearest_int, requantize,
)


class Q6K(KQuantFormat, name="q6_k"):
    ggml_type = GGMLQuantizationType.Q6_K
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]
    code_group = 16

    def _quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        n_blocks = x.shape[0]
        scales, L = make_qx_quants(columns(x, 16), 32)
        scales = scales.reshape(n_blocks, 16)
        amax, max_scale = abs_max(scales.T)
        zero = amax < GROUP_MAX_EPS  # the whole super-block is written as zeros
        with np.errstate(divide="ignore"):
            iscale = np.float32(-128) / np.where(zero, np.float32(1), max_scale)
            d = fp16(np.float32(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), np.float32(127)).astype(np.int8)
        sub_d = d.astype(np.float32)[:, None] * sc
        L = requantize(x, sub_d, None, -32, 31, L, 16).astype(np.uint8)
        L = L.reshape(n_blocks, 2, 4, 32)  # (block, half, quarter, l)
        ql = np.concatenate([
            (L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4),
        ], axis=2)  # (B, 2, 64)
        qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        out = np.concatenate([
            ql.reshape(n_blocks, 128), qh.reshape(n_blocks, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2),
        ], axis=1)
        out[zero] = 0
        return out

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        ql = blocks[:, :128].reshape(-1, 2, 2, 32)
        low = np.stack([ql & 0xF, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # quarter r = 2*(r // 2) + r % 2
        high = bits_np(blocks[:, 128:192].reshape(-1, 32), 2).reshape(-1, 2, 4, 32)
        q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32).reshape(-1, 16, 16)
        sc = blocks[:, 192:208].view(np.int8)
        d = half_np(blocks[:, 208:210])
        return ((d * sc)[..., None] * q).reshape(-1, 256)

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        ql = blocks[:, :128].reshape(-1, 2, 2, 32)
        low = torch.stack([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        high = bits_torch(blocks[:, 128:192].reshape(-1, 32), 2).reshape(-1, 2, 4, 32)
        q = (low | (high << 4)).to(torch.int16).reshape(-1, 16, 16) - 32
        sc = blocks[:, 192:208].contiguous().view(torch.int8)
        d = half_torch(blocks[:, 208:210])
        return q, d * sc, None
