"""Storage bytes -> the pieces a fused kernel is repacked from: (codes, scales[, mins]).

The file keeps each weight in its storage format (s2conv's block formats or a ggml type); the kernels want integer
codes and float scales in their own GPU layout (`s2conv.runtime.kernels.REPACK`). This module decodes s2conv's
block layouts (docs/formats.md) into those pieces, in torch, on the weight's device; the ggml types decode
themselves (`QuantFormat.integer_codes_torch`).
"""
from __future__ import annotations

import torch

from s2conv.quant_formats import QuantFormat

_SCALE_BYTES = 4  # s2conv formats: every block starts with a little-endian float32 scale


def _s2_blocks(fmt: QuantFormat, data: torch.Tensor, k: int):
    group = fmt.group_size or k
    blocks = data.reshape(data.shape[0], -1, _SCALE_BYTES + fmt._code_bytes(group))
    scales = blocks[..., :_SCALE_BYTES].contiguous().view(torch.float32)[..., 0]  # [N, groups]
    codes = fmt._decode_torch(blocks[..., _SCALE_BYTES:].reshape(-1, fmt._code_bytes(group)), group)
    return codes.reshape(data.shape[0], k), scales


def kernel_pieces(fmt: QuantFormat, data: torch.Tensor, k: int) -> tuple[torch.Tensor, ...] | None:
    """(codes [N, k], scales[, mins]) for `REPACK[fmt.name]`, or None when no kernel reads this format."""
    data = data.view(torch.uint8)
    if fmt.name in ("q8", "q4", "q3", "q2"):
        codes, scales = _s2_blocks(fmt, data, k)
        return codes.round().to(torch.int8), scales[:, 0] if fmt.name == "q8" else scales
    if fmt.name == "fp8":
        codes, scales = _s2_blocks(fmt, data, k)
        return codes.to(torch.float8_e4m3fn), scales[:, 0]
    codes = fmt.integer_codes_torch(data, k)  # the ggml types: integer codes with per-group scales and mins
    if codes is None:
        return None
    if codes.two_level is not None:  # K-quants with mins: their scales as the file keeps them (layout.repack_int)
        return codes.codes, *codes.two_level
    return codes.codes, codes.scales, *(() if codes.mins is None else (codes.mins,))
