"""QuantLinear: a Linear layer whose weight stays packed in its storage format on the device.

`forward` is the one dispatch point between the reference path (dequantize the whole weight, then F.linear: always
correct, runs on the CPU too) and a fused kernel for the format (`s2conv.runtime.kernels.KERNELS`, CUDA only).
Model code never sees the difference: the module replaces an `nn.Linear` and its `weight` buffer has the GGUF name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2conv.quant_formats import QuantFormat


def _kernels():
    """(KERNELS, REPACK) of the fused Triton kernels, or None when triton is missing."""
    try:
        from s2conv.runtime.kernels import KERNELS, REPACK
    except ImportError:  # triton missing: reference path only
        return None
    return KERNELS, REPACK


class QuantLinear(nn.Module):
    """y = x W^T with W [out_features, in_features] stored as `fmt` bytes [out_features, fmt.row_bytes(in)]."""

    def __init__(self, fmt: QuantFormat, in_features: int, out_features: int, device=None):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, fmt.row_bytes(in_features), dtype=torch.uint8,
                                                   device=device))
        self.kernel = None  # set by `prepare_kernel`: (launcher, packed tensors)

    def prepare_kernel(self) -> bool:
        """Repack the weight into the fused kernel's layout when a kernel exists for this format on this device."""
        from s2conv.runtime.kernel_weights import kernel_pieces

        found = _kernels()
        self.kernel = None
        if found is None or not self.weight.is_cuda or self.fmt.name not in found[0]:
            return False
        pieces = kernel_pieces(self.fmt, self.weight, self.in_features)
        if pieces is None:
            return False
        kernels, repack = found
        self.kernel = (kernels[self.fmt.name], repack[self.fmt.name](*pieces))
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None and x.is_cuda:
            launcher, packed = self.kernel
            return launcher(x, packed)
        return F.linear(x, self.dequantized(x.dtype))

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return self.fmt.dequantize_torch(self.weight, self.in_features, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"
