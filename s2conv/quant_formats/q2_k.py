"""Q2_K, ggml's 2.625-bit K-quant: 256-weight super-blocks of 16 sub-blocks of 16, w = d*sc*q - dmin*m, q in [0, 3].

Block (84 bytes): scales[16] (sub-block j: sc in the low nibble, m in the high nibble), qs[64] (2-bit levels packed
like Q3_K's), d fp16, dmin fp16.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from s2conv.quant_formats._kquant import (
    KQuantFormat, bits_np, bits_torch, columns, fp16, half_np, half_torch, make_qkx2_quants, nearest_int,
    requantize, to_u8,
)
from s2conv.quant_formats.q3_k import pack_2bit


def _nibble_scale(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 16) non-negative sub-block values -> (4-bit multiples (B, 16) uint8, fp16 unit (B,)), unit = max/15."""
    top = np.maximum(values.max(axis=1), np.float32(0))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # inf only for denormal-tiny blocks
        inv = np.where(top > 0, np.float32(15) / top, np.float32(0))
        return to_u8(nearest_int(inv[:, None] * values)), np.where(top > 0, fp16(top / np.float32(15)), np.float16(0))


class Q2K(KQuantFormat, name="q2_k"):
    ggml_type = GGMLQuantizationType.Q2_K
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K][1]
    code_group = 16
    chunk_weights = 1 << 18  # short (16-weight) columns: larger chunks amortize the per-call overhead

    def _quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        n_blocks = x.shape[0]
        xs = columns(x, 16)
        scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        ls, d = _nibble_scale(scales.reshape(n_blocks, 16))
        lm, dmin = _nibble_scale(mins.reshape(n_blocks, 16))
        packed = ls | (lm << 4)  # uint8 arithmetic: the C code ORs (lm << 4) into a uint8_t
        sub_d = d.astype(np.float32)[:, None] * (packed & 0xF)
        sub_m = dmin.astype(np.float32)[:, None] * (packed >> 4)
        L = requantize(x, sub_d, sub_m, 0, 3, L, 16).astype(np.uint8)
        return np.concatenate([
            packed, pack_2bit(L), d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
        ], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        sc = blocks[:, :16]
        q = bits_np(blocks[:, 16:80].reshape(-1, 32), 2).reshape(-1, 16, 16).astype(np.float32)
        d, dmin = half_np(blocks[:, 80:82]), half_np(blocks[:, 82:84])
        return ((d * (sc & 0xF))[..., None] * q - (dmin * (sc >> 4))[..., None]).reshape(-1, 256)

    def _sub_scales_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sc = blocks[:, :16]
        return half_torch(blocks[:, 80:82]), half_torch(blocks[:, 82:84]), sc & 0xF, sc >> 4

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = bits_torch(blocks[:, 16:80].reshape(-1, 32), 2).reshape(-1, 16, 16)
        d, dmin, sc, m = self._sub_scales_blocks(blocks)
        return q, d * sc, dmin * m
