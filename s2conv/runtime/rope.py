"""Interleaved-pair rotary position embedding (RoPE) shared by the slow AR, the fast AR and the codec transformers.

The table is built with the exact fp32 recipe fish-speech uses and then rounded to bfloat16, because the model was
trained with that rounding (spec ERRATA 1); the rotation itself runs in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor


def precompute_freqs_cis(n_positions: int, head_dim: int, base: float) -> Tensor:
    """RoPE table [n_positions, head_dim // 2, 2] of (cos, sin) pairs in bfloat16, on the CPU.

    Bit-exact with fish-speech: every step (frequency power, outer product, `torch.polar`) runs in fp32 on the CPU
    before the single rounding to bfloat16. Rows do not depend on `n_positions`, so a shorter table is a prefix of a
    longer one.
    """
    cpu = torch.device("cpu")
    exponents = torch.arange(0, head_dim, 2, device=cpu)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (float(base) ** exponents)
    angles = torch.outer(torch.arange(n_positions, device=cpu).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([cis.real, cis.imag], dim=-1).to(torch.bfloat16)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of each head by the table rows of their positions.

    x: [B, S, H, D]; freqs_cis: [S, D // 2, 2] (any float dtype, usually the bf16 table rows of the positions),
    or [B, S, D // 2, 2] with table rows per batch row (left-padded batches). The product is computed in fp32 and
    cast back to x's dtype.
    """
    xp = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, D/2, 2]
    f = freqs_cis.float().view(-1 if freqs_cis.dim() == 4 else 1, xp.shape[1], 1, xp.shape[3], 2)
    cos, sin = f[..., 0], f[..., 1]
    re = xp[..., 0] * cos - xp[..., 1] * sin
    im = xp[..., 1] * cos + xp[..., 0] * sin
    return torch.stack([re, im], dim=-1).flatten(3).type_as(x)
