"""Q3_K, ggml's 3.4375-bit K-quant: 256-weight super-blocks of 16 sub-blocks of 16, w = d*(sc - 32)*(q - 4).

Block (110 bytes): hmask[32] (bit k of byte l: 1 when weight 32*k + l has q >= 4), qs[64] (low 2 bits: weight
128*c + 32*s + l in bits 2s of byte 32*c + l), scales[12] (6-bit sc: low nibbles in bytes 0-7, sub-block j in byte
j % 8 nibble j // 8; high 2 bits of sub-block j in byte 8 + j % 4 at bit 2*(j // 4)), d fp16.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from s2conv.quant_formats._kquant import (
    KQuantFormat, abs_max, bits_np, bits_torch, columns, fp16, half_np, half_torch, make_q3_quants, nearest_int,
    requantize,
)

_BIT_WEIGHTS = (1 << np.arange(8, dtype=np.uint8))[None, :, None]
_PAIR_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]


def pack_2bit(L: np.ndarray) -> np.ndarray:
    """(B, 256) levels in [0, 3] -> (B, 64): byte 32*c + l holds weight 128*c + 32*s + l at bits 2s."""
    L = L.reshape(-1, 2, 4, 32)
    return np.bitwise_or.reduce(L << _PAIR_SHIFTS[:, None], axis=2).reshape(-1, 64)


class Q3K(KQuantFormat, name="q3_k"):
    ggml_type = GGMLQuantizationType.Q3_K
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q3_K][1]
    code_group = 16
    chunk_weights = 1 << 18  # its search runs on (N,) vectors, one per sub-block: larger chunks amortize calls

    def _quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        n_blocks = x.shape[0]
        scales, L = make_q3_quants(columns(x, 16), 4)
        scales = scales.reshape(n_blocks, 16)
        _, max_scale = abs_max(scales.T)
        nonzero = max_scale != 0
        with np.errstate(divide="ignore"):
            iscale = np.float32(-32) / np.where(nonzero, max_scale, np.float32(1))
            d = np.where(nonzero, fp16(np.float32(1) / iscale), np.float16(0))
        ls = np.clip(nearest_int(iscale[:, None] * scales), np.float32(-32), np.float32(31)) + np.float32(32)
        ls = np.where(nonzero[:, None], ls, np.float32(0)).astype(np.uint8)  # (B, 16) in [0, 63]
        packed = np.concatenate([
            (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
            np.bitwise_or.reduce((ls >> 4).reshape(-1, 4, 4) << _PAIR_SHIFTS[:, :, 0][:, :, None], axis=1),
        ], axis=1)
        sub_d = d.astype(np.float32)[:, None] * (ls.astype(np.int8) - np.int8(32))
        L = requantize(x, sub_d, None, -4, 3, L, 16).astype(np.uint8)
        L = L.reshape(n_blocks, 8, 32)
        hmask = np.bitwise_or.reduce((L >> 2) * _BIT_WEIGHTS, axis=1)
        return np.concatenate([hmask, pack_2bit(L & 3), packed, d.view(np.uint8).reshape(-1, 2)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        high = bits_np(blocks[:, :32], 1)  # (B, 8, 32)
        low = bits_np(blocks[:, 32:96].reshape(-1, 32), 2).reshape(-1, 8, 32)
        q = (low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)).astype(np.float32).reshape(-1, 16, 16)
        s = blocks[:, 96:108]
        sc_low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
        sc_high = bits_np(s[:, 8:12], 2).reshape(-1, 16)
        sc = (sc_low | (sc_high << 4)).astype(np.int8) - np.int8(32)
        d = half_np(blocks[:, 108:110])
        return ((d * sc)[..., None] * q).reshape(-1, 256)

    def _sub_scales_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(d, d, sc, 4 sc): the signed 6-bit scale sc - 32 as the sub-block scale and 4 times it as the min, so
        that w = d * sc * (q + 4) - d * (4 sc) takes the unsigned codes q + 4 in [0, 7] (4 sc fits a signed
        byte), as the K-quants with mins do."""
        s = blocks[:, 96:108]
        sc_low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
        sc_high = bits_torch(s[:, 8:12], 2).reshape(-1, 16)
        sc = (sc_low | (sc_high << 4)).to(torch.int16) - 32
        d = half_torch(blocks[:, 108:110])
        return d, d, sc, 4 * sc

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unsigned codes q + 4 = low | high << 2 in [0, 7] per 16-weight sub-block, scale d * sc and min
        d * 4 sc (all exact in float32: w = d * sc * (q + 4) - 4 d * sc = d * sc * q)."""
        high = bits_torch(blocks[:, :32], 1)
        low = bits_torch(blocks[:, 32:96].reshape(-1, 32), 2).reshape(-1, 8, 32)
        u = (low.to(torch.int16) | (high.to(torch.int16) << 2)).reshape(-1, 16, 16)
        d, _, sc, m = self._sub_scales_blocks(blocks)
        return u, d * sc, d * m
