"""Triton kernels for the codec: Snake, the activation between every convolution of the DAC decoder and encoder.

Eager Snake is five elementwise kernels (multiply, sine, square, reciprocal-multiply, add), each a full pass over
activations of up to 96 x 524,288 values at 256 frames; one kernel reads x once and writes y once, in fp32 inside.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from s2conv.errors import RuntimeModelError
from s2conv.runtime.kernels.launch import launch


@triton.jit
def _snake_kernel(x_ptr, a_ptr, y_ptr, C, L, stride_xb, stride_xc, BLOCK: tl.constexpr):
    """y[b, c, t] = x + sin(alpha[c] x)^2 / (alpha[c] + 1e-9) for t in one BLOCK of a row (b, c); fp32 math."""
    row = tl.program_id(1)
    b = row // C
    c = row - b * C
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + c * stride_xc + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + c).to(tl.float32)
    s = tl.sin(a * x)
    y = x + s * s / (a + 1e-9)
    tl.store(y_ptr + row.to(tl.int64) * L + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake of x [B, C, L] (rows may be strided; the last axis contiguous) with alpha [1, C, 1] or [C]: a new
    contiguous tensor of x's shape and dtype."""
    if x.dim() != 3 or alpha.numel() != x.shape[1]:
        raise RuntimeModelError(f"snake: x must be [B, C, L] with C = alpha's {alpha.numel()} channels, "
                                f"got {tuple(x.shape)}")
    if x.stride(2) != 1:
        x = x.contiguous()
    b, c, n = x.shape
    y = torch.empty((b, c, n), dtype=x.dtype, device=x.device)
    block = min(4096, triton.next_power_of_2(max(n, 16)))
    launch(_snake_kernel, (triton.cdiv(n, block), b * c), x, alpha.reshape(c).contiguous(), y, c, n, x.stride(0),
           x.stride(1), BLOCK=block, num_warps=8 if block >= 2048 else 4, outputs=(y,))
    return y
