"""Storage bytes -> the pieces a fused kernel is repacked from: (codes, scales[, mins]).

The file keeps each weight in its storage format (s2conv's block formats or a ggml type); the kernels want integer
codes and float scales in their own GPU layout (`s2conv.runtime.kernels.REPACK`). This module decodes the storage
layouts (docs/formats.md; ggml's block structs) into those pieces, in torch, on the weight's device.
"""
from __future__ import annotations

import torch

from s2conv.quant_formats import QuantFormat

_SCALE_BYTES = 4  # s2conv formats: every block starts with a little-endian float32 scale


def _half(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 -> (...) float32."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _s2_blocks(fmt: QuantFormat, data: torch.Tensor, k: int):
    group = fmt.group_size or k
    blocks = data.reshape(data.shape[0], -1, _SCALE_BYTES + fmt._code_bytes(group))
    scales = blocks[..., :_SCALE_BYTES].contiguous().view(torch.float32)[..., 0]  # [N, groups]
    codes = fmt._decode_torch(blocks[..., _SCALE_BYTES:].reshape(-1, fmt._code_bytes(group)), group)
    return codes.reshape(data.shape[0], k), scales


def kernel_pieces(fmt: QuantFormat, data: torch.Tensor, k: int) -> tuple[torch.Tensor, ...] | None:
    """(codes [N, k], scales[, mins]) for `REPACK[fmt.name]`, or None when no kernel reads this format."""
    n = data.shape[0]
    data = data.view(torch.uint8)
    if fmt.name in ("q8", "q4", "q3", "q2"):
        codes, scales = _s2_blocks(fmt, data, k)
        return codes.round().to(torch.int8), scales[:, 0] if fmt.name == "q8" else scales
    if fmt.name == "fp8":
        codes, scales = _s2_blocks(fmt, data, k)
        return codes.to(torch.float8_e4m3fn), scales[:, 0]
    if fmt.name == "q8_0":  # block: fp16 d, int8 qs[32]
        blocks = data.reshape(n, k // 32, 34)
        return blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), _half(blocks[..., :2])
    if fmt.name == "q4_0":  # block: fp16 d, qs[16]: element j in the low nibble of byte j, j + 16 in the high one
        blocks = data.reshape(n, k // 32, 18)
        qs = blocks[..., 2:]
        codes = torch.cat([qs & 15, qs >> 4], dim=-1).to(torch.int8) - 8
        return codes.reshape(n, k), _half(blocks[..., :2])
    if fmt.name == "q4_k":  # super-block of 8 x 32: w = d * sc * q - dmin * m
        from s2conv.quant_formats._kquant import unpack_scales_mins_k4_torch

        blocks = data.reshape(-1, 144)
        d, dmin = _half(blocks[:, 0:2])[:, None], _half(blocks[:, 2:4])[:, None]
        sc, m = unpack_scales_mins_k4_torch(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, k).to(torch.int8)
        return q, (d * sc).reshape(n, k // 32), (dmin * m).reshape(n, k // 32)
    return None
