"""QuantLinear: a Linear layer whose weight stays quantized on the device (storage bytes, or the kernel's layout).

`forward` is the one dispatch point between the reference path (dequantize the whole weight, then F.linear: always
correct, runs on the CPU too) and a fused kernel for the format (`s2conv.runtime.kernels.KERNELS`, CUDA only).
Model code never sees the difference: the module replaces an `nn.Linear` and its `weight` buffer has the GGUF name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2conv.errors import RuntimeModelError
from s2conv.quant_formats import QuantFormat


def _kernels():
    """(KERNELS, REPACK) of the fused Triton kernels, or None when triton is missing."""
    try:
        from s2conv.runtime.kernels import KERNELS, REPACK
    except ImportError:  # triton missing: reference path only
        return None
    return KERNELS, REPACK


class QuantLinear(nn.Module):
    """y = x W^T with W [out_features, in_features] stored as `fmt` bytes [out_features, fmt.row_bytes(in)].

    What is resident, and where forward reads W from:
    - loaded, no kernel (CPU, a format without a kernel, or before `prepare_kernel`): `weight` holds the storage
      bytes uint8 [out, row_bytes] (the GGUF block layout); `kernel` is None; forward dequantizes the bytes.
    - after a successful `prepare_kernel`: `kernel = (launcher, packed)` holds W in the kernel layout
      (`s2conv.runtime.kernels.layout`) and is the only copy: `weight` is an empty uint8 [out, 0] tensor (the
      storage bytes are freed, so a 4-bit model takes ~4-bit memory). forward runs the kernel on CUDA inputs and
      dequantizes `packed` (exactly the same W) otherwise.
    `state_dict()` then holds the empty `weight`; loading a state dict with the full storage bytes (e.g.
    `load_state_dict`) drops the kernel and restores the storage state, to be prepared again. The kernel is built
    on the weight's device and moves with the module (`.to(device)`).
    """

    def __init__(self, fmt: QuantFormat, in_features: int, out_features: int, device=None):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.register_buffer("weight", torch.empty(self.storage_shape, dtype=torch.uint8, device=device))
        self.kernel = None  # set by `prepare_kernel`: (launcher, packed tensors)
        self._kernel_on_cpu = False  # prepare_kernel(force=True): CPU inputs take the kernel too (interpreter)

    @property
    def storage_shape(self) -> tuple[int, int]:
        """Shape of the storage bytes: [out_features, fmt.row_bytes(in_features)]."""
        return self.out_features, self.fmt.row_bytes(self.in_features)

    @property
    def storage_released(self) -> bool:
        """Whether `weight` no longer holds the storage bytes (a successful `prepare_kernel` released them)."""
        return self.weight.numel() == 0

    def _missing_weight(self) -> RuntimeModelError:
        return RuntimeModelError(
            f"{self.fmt.name} QuantLinear [{self.out_features}, {self.in_features}]: storage bytes released and no "
            "kernel holds the weight (expected the kernel of prepare_kernel); load the weight again")

    def prepare_kernel(self, force: bool = False) -> bool:
        """Repack the weight into the fused kernel's layout and free the storage bytes, when a kernel exists for
        this format on this device (CUDA; `force=True` also on CPU, where the kernels run in triton's interpreter:
        tests). Returns whether the module now runs the kernel. A second call keeps the existing kernel (the storage
        bytes it came from are gone); new storage bytes assigned to `weight` are repacked again."""
        from s2conv.runtime.kernel_weights import kernel_pieces

        if self.storage_released:
            if self.kernel is None:
                raise self._missing_weight()
            return True
        found = _kernels()
        self.kernel = None
        if found is None or not (self.weight.is_cuda or force) or self.fmt.name not in found[0]:
            return False
        pieces = kernel_pieces(self.fmt, self.weight, self.in_features)
        if pieces is None:
            return False
        kernels, repack = found
        self.kernel = (kernels[self.fmt.name], repack[self.fmt.name](*pieces))
        self._kernel_on_cpu = force
        del pieces
        # the packed tensors are new memory (kernel_pieces copies), so this drops the last reference to the bytes
        self.weight = torch.empty(self.out_features, 0, dtype=torch.uint8, device=self.weight.device)
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None and (x.is_cuda or self._kernel_on_cpu):
            launcher, packed = self.kernel
            return launcher(x, packed)
        return F.linear(x, self.dequantized(x.dtype))

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The float weight [out_features, in_features] in `dtype`, from whichever copy is resident (both decode
        to exactly the same values)."""
        if self.kernel is not None:
            from s2conv.runtime.kernels.layout import dequantize_packed

            return dequantize_packed(self.fmt.name, self.kernel[1], self.in_features, dtype)
        if self.storage_released:
            raise self._missing_weight()
        return self.fmt.dequantize_torch(self.weight, self.in_features, dtype=dtype)

    def _apply(self, fn, recurse=True):
        """`.to(device)`, `.cuda()`, `.half()`, ...: the kernel tensors move with the module but keep their dtypes
        (the kernels read int32 codes and fp32 scales whatever the activation dtype)."""
        super()._apply(fn, recurse)
        if self.kernel is not None:
            launcher, packed = self.kernel
            self.kernel = (launcher, {name: t.to(fn(t.new_empty(0)).device) for name, t in packed.items()})
        return self

    def resident_bytes(self) -> int:
        """Bytes this module keeps in memory for its weight: storage bytes plus kernel tensors (one of the two
        after `prepare_kernel`)."""
        tensors = [self.weight] + (list(self.kernel[1].values()) if self.kernel is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # New storage bytes make the kernel stale; a released [out, 0] buffer takes them back at full shape (any
        # other shape is left to nn.Module's size-mismatch error).
        new = state_dict.get(prefix + "weight")
        if isinstance(new, Tensor) and tuple(new.shape) == self.storage_shape:
            self.kernel = None
            if self.storage_released:
                self.weight = torch.empty(self.storage_shape, dtype=torch.uint8, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        resident = "kernel layout" if self.kernel is not None else "storage bytes"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"resident={resident}")
