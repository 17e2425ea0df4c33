"""Shared machinery of the ggml block formats (f16, q8_0, q4_0, ... and the dequantize-only types).

`GGMLFormat` runs a subclass's block kernels (pure torch, float32) over a tensor in row chunks that fit in the CPU
cache, checks inputs, and turns the kernels' results into the (rows, row_bytes) uint8 matrix GGUF stores.
The kernels reproduce llama.cpp's reference arithmetic operation by operation, so bytes match gguf-py exactly.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from s2conv.errors import QuantFormatError
from s2conv.quant_formats.base import QuantFormat, combine_codes

# Elements per chunk: 256 Ki float32 = 1 MiB stays in the L2 cache through the kernels' passes.
CHUNK_ELEMENTS = 1 << 18
_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="s2conv-quant")

# roundf(v) == trunc(v + HALF_DOWN) for 0 <= v < 2**22, HALF_DOWN being the float32 just below 0.5: adding exactly
# 0.5 would round 0.49999997 + 0.5 up to 1.0; adding 0.49999997 still reaches k+1 from k+0.5, because
# k+0.99999997 rounds to k+1 for k >= 1 and 0.5+0.49999997 rounds (ties-to-even) to 1.0.
HALF_DOWN = np.nextafter(np.float32(0.5), np.float32(0))


def roundf_int8(v_abs: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """C `roundf` (ties away from zero) of the float32 values +-v_abs (|v| < 128) as int8.

    v_abs is the magnitude (overwritten), `negative` the sign mask; rounding magnitudes keeps it to two passes.
    """
    v_abs += HALF_DOWN
    q = v_abs.astype(np.int8)  # the cast truncates toward zero
    m = negative.view(np.int8)  # 1 where negative
    q ^= -m  # two's complement negation where m == 1: (q ^ -1) + 1 == -q
    q += m
    return q


def absmax(a: np.ndarray) -> np.ndarray:
    """(nb, n) non-negative float32 -> (nb, 1) max; compares the bit patterns as int32 (same order, faster)."""
    return a.view(np.int32).max(axis=-1, keepdims=True).view(np.float32)


def signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """(nb, n) -> (nb, 1): the element of largest magnitude, the first one on ties (+m vs -m), as llama.cpp's
    `if (amax < fabsf(v))` loop picks it. An all-zero block gives +0.0 (C's initial value) even when it holds
    -0.0; adding +0.0 does that, as -0.0 + 0.0 == +0.0. (gguf-py would return the block's first zero.)"""
    return np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[:, None], axis=-1) + np.float32(0)


def block_min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, n) -> ((nb, 1) min, (nb, 1) max) as llama.cpp's `if (v < min) min = v` loops find them: where the
    extreme is zero, the first zero in the block decides its sign (numpy's min/max pick an arbitrary one)."""
    lo = blocks.min(axis=-1, keepdims=True)
    hi = blocks.max(axis=-1, keepdims=True)
    for ext, first in ((lo, np.argmin), (hi, np.argmax)):
        rows = np.flatnonzero(ext == 0)  # rare: only blocks whose min or max is exactly zero
        if rows.size:
            sub = blocks[rows]
            ext[rows] = np.take_along_axis(sub, first(sub, axis=-1)[:, None], axis=-1)
    return lo, hi


def safe_inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d == 0 (the `d ? 1.0f/d : 0.0f` of the C reference)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(nb, 32) uint8 values < 16 -> (nb, 16): byte j = q[j] | q[j+16] << 4 (ggml's Q4/Q5 low-bit order)."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(nb, 8k) uint8 of 0/1 -> (nb, k) bytes, element 8i+j in bit j of byte i (a little-endian bit field)."""
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(nb, k) uint8 -> (nb, 2k): the low nibbles of all bytes, then the high nibbles (inverse of pack_nibbles)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(nb, k) uint8 -> (nb, 8k) uint8 of 0/1, element 8i+j = bit j of byte i (inverse of pack_bits)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)


def unpack_5bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5 blocks: (nb, 4) high-bit field and (nb, 16) low nibbles -> (nb, 32) uint8 values 0..31."""
    return unpack_nibbles(qs) | (unpack_bits(qh) << 4)


def f16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 (any strides) -> (..., 1) float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def u32_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(..., 4k) uint8 -> (..., k) int64 holding the little-endian uint32 words (torch lacks full uint32 ops)."""
    return b.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def u16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """(..., 2k) uint8 -> (..., k) int32 holding the little-endian uint16 words."""
    return b.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def as_rows(w: np.ndarray | torch.Tensor, fmt: str, tensor: str) -> torch.Tensor:
    """Any 2-D float array or tensor -> a CPU torch tensor sharing memory when possible (dtype unchanged)."""
    if isinstance(w, np.ndarray):
        if w.dtype.kind != "f":
            raise QuantFormatError(f"{tensor}: format {fmt!r} quantizes float data, got dtype {w.dtype}")
        w = torch.from_numpy(np.ascontiguousarray(w))
    elif not isinstance(w, torch.Tensor):
        raise QuantFormatError(f"{tensor}: expected a numpy array or torch tensor, got {type(w).__name__}")
    elif not w.dtype.is_floating_point:
        raise QuantFormatError(f"{tensor}: format {fmt!r} quantizes float data, got dtype {w.dtype}")
    if w.ndim != 2:
        raise QuantFormatError(
            f"{tensor}: format {fmt!r} expects a 2-D (rows, cols) tensor, got shape {tuple(w.shape)}"
        )
    return w.detach().cpu()


def row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class GGMLFormat(QuantFormat):
    """A ggml tensor type. Subclasses set `ggml_type` (block_size/type_size follow from gguf's table) and
    implement `_quantize_blocks` / `_dequantize_blocks` on (n_blocks, block_size) / (n_blocks, type_size)."""

    can_quantize: ClassVar[bool] = True

    def __init_subclass__(cls, name: str | None = None, **kw):
        if "ggml_type" in cls.__dict__:
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml_type]
        super().__init_subclass__(name=name, **kw)

    # ----- kernels: quantize in numpy (fastest on CPU), dequantize in torch (any device) ----------------------
    def _quantize_blocks(self, blocks: np.ndarray, tensor: str) -> np.ndarray:
        """(nb, block_size) float32 numpy (read-only: it may be the caller's array) -> (nb, type_size) uint8."""
        raise NotImplementedError

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """(nb, type_size) uint8 -> (nb, block_size) float32. Formats with integer codes (`code_group`) decode
        through `_codes_blocks`; the others override this."""
        if not self.code_group:
            raise NotImplementedError
        return combine_codes(*self._codes_blocks(blocks))

    # ----- public API --------------------------------------------------------------------------------------------
    def quantize(self, w: np.ndarray | torch.Tensor, *, method: str = "search", tensor: str = "tensor") -> np.ndarray:
        """(rows, cols) float -> (rows, row_bytes(cols)) uint8, bit-identical to llama.cpp / gguf-py.

        ggml's reference quantizers have a single method, so `method` ("rtn" or "search") changes nothing.
        Raises QuantFormatError for NaN/Inf input, a scale that overflows float16, or a bad shape.
        """
        if not self.can_quantize:
            raise QuantFormatError(f"{tensor}: format {self.name!r} can only be decoded; s2conv cannot quantize to it")
        if method not in ("rtn", "search"):
            raise QuantFormatError(f"{tensor}: unknown quantization method {method!r}; expected 'rtn' or 'search'")
        x = as_rows(w, self.name, tensor)
        rows, cols = x.shape
        self.check_cols(cols, tensor)
        out = np.empty((rows, self.row_bytes(cols)), dtype=np.uint8)

        def work(sl: slice) -> None:
            blocks = x[sl].to(torch.float32).numpy().reshape(-1, self.block_size)
            out[sl] = self._quantize_blocks(blocks, tensor).reshape(sl.stop - sl.start, -1)

        # numpy releases the GIL inside its loops, so threads over row chunks use all cores.
        for fut in [_POOL.submit(work, sl) for sl in row_chunks(rows, cols)]:
            fut.result()
        return out

    def dequantize(self, data: np.ndarray, n_cols: int) -> np.ndarray:
        """(rows, row_bytes(n_cols)) uint8 -> (rows, n_cols) float32, bit-identical to gguf-py's dequantize."""
        data = np.ascontiguousarray(data)
        self._check_data(tuple(data.shape), data.dtype == np.uint8, n_cols)
        out = np.empty((data.shape[0], n_cols), dtype=np.float32)
        src, dst = torch.from_numpy(data), torch.from_numpy(out)
        for sl in row_chunks(data.shape[0], n_cols):
            dst[sl] = self._dequantize_blocks(src[sl].reshape(-1, self.type_size)).reshape(-1, n_cols)
        return out

    def dequantize_torch(self, data: torch.Tensor, n_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows, row_bytes(n_cols)) uint8 on any device -> (rows, n_cols) `dtype` on that device.
        Computes in float32 (exactly `dequantize`) and casts at the end."""
        out = self._dequantize_blocks(self._torch_blocks(data, n_cols))
        return out.reshape(data.shape[0], n_cols).to(dtype)

    def _torch_blocks(self, data: torch.Tensor, n_cols: int) -> torch.Tensor:
        self._check_data(tuple(data.shape), data.dtype == torch.uint8, n_cols)
        return data.contiguous().reshape(-1, self.type_size)

    def _check_data(self, shape: tuple, is_uint8: bool, n_cols: int) -> None:
        self.check_cols(n_cols)
        expected = self.row_bytes(n_cols)
        if not is_uint8 or len(shape) != 2 or shape[1] != expected:
            raise QuantFormatError(
                f"format {self.name!r}: expected uint8 data of shape (rows, {expected}) for {n_cols} columns, "
                f"got shape {shape}{'' if is_uint8 else ' (not uint8)'}"
            )

    # ----- helpers for subclasses ---------------------------------------------------------------------------------
    def _require_finite(self, *values: np.ndarray, tensor: str) -> None:
        """Raise when a block statistic (max, min...) is NaN/Inf: those propagate from any non-finite input."""
        if not all(np.isfinite(v).all() for v in values):
            raise QuantFormatError(f"{tensor}: contains NaN or Inf values; format {self.name!r} needs finite weights")

    def _scale_bits(self, d: np.ndarray, tensor: str, what: str = "scale") -> np.ndarray:
        """float32 (nb, 1) -> (nb, 2) uint8 half (round-to-nearest-even, GGML_FP32_TO_FP16); raise when it
        overflows float16, where the block would decode to Inf."""
        with np.errstate(over="ignore"):
            h = d.astype(np.float16)
        if not np.isfinite(h).all():
            raise QuantFormatError(
                f"{tensor}: block {what} {np.abs(d).max():.6g} overflows float16 (max 65504) in format {self.name!r}"
            )
        return h.view(np.uint8)
