"""The QuantFormat base class and the format registry.

A format turns a 2-D float tensor (rows = output features, columns = input features, PyTorch Linear layout) into
bytes, row by row, and back. Every row is encoded independently into `row_bytes(n_cols)` bytes, so a GGUF tensor
of a format is a (rows, row_bytes) byte matrix. Subclasses register themselves by name:

    class Q4(QuantFormat, name="q4"):
        ...

and `get_format("q4")` finds them. Adding a format means adding one module to this package and importing it in
`__init__.py`; the tests loop over `list_formats()`, so a new format is tested automatically.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType

from s2conv.errors import QuantFormatError

_REGISTRY: dict[str, "QuantFormat"] = {}


class IntegerCodes(NamedTuple):
    """A weight [rows, cols] as integer codes and per-group float32 scales (and mins): see `code_group`.

    two_level (K-quants with mins: q2_k, q4_k, q5_k; and q3_k, its signed scale's 4 times as the min of codes
    stored unsigned): the same scales and mins as the file keeps them, a signed byte each per group under a float
    per 256-column super-block: (sub int16 [rows, groups] = (sc & 0xFF) | m << 8, sup float32
    [rows, cols // 256, 2] = (d, dmin)), scale = d * sc and min = dmin * m exactly (`two_level_scales`)."""

    codes: torch.Tensor  # int16 [rows, cols]
    scales: torch.Tensor  # float32 [rows, cols // group]
    mins: torch.Tensor | None  # float32 [rows, cols // group] (w = scale * code - min), or None
    group: int
    two_level: tuple[torch.Tensor, torch.Tensor] | None = None


def two_level_scales(sub: torch.Tensor, sup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`IntegerCodes.two_level` -> float32 (scales, mins) [rows, groups]: d * sc and dmin * m per group (sc and m
    signed bytes)."""
    v = sub.to(torch.int32)  # sign-extended from int16: m's sign
    per = v.shape[1] // sup.shape[1]  # groups per super-block
    d, dmin = (sup[..., i].repeat_interleave(per, dim=1) for i in (0, 1))
    return ((v << 24) >> 24).to(torch.float32) * d, (v >> 8).to(torch.float32) * dmin


def combine_codes(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """Blocks of integer codes q [nb, S, G] with scales (and mins) [nb, S] -> float32 weights [nb, S * G]:
    scale * q - min per group, in float32 (the products of fp16 block scales and small integers are exact)."""
    w = scales[..., None] * q.to(torch.float32)
    if mins is not None:
        w = w - mins[..., None]
    return w.reshape(q.shape[0], -1)


class QuantFormat:
    """One storage format. Instances are stateless singletons held in the registry.

    Class attributes a subclass sets:
      name:        the CLI / metadata name ("q4", "q4_k", "bf16", ...)
      block_size:  elements per block along a row; a row length must be a multiple of it. Per-row formats
                   (one scale per row) use 1 and put the scale in `row_overhead`.
      type_size:   bytes per block
      row_overhead: extra bytes per row (per-row scales), 0 for block formats
      ggml_type:   the GGUF tensor type the bytes are stored as: the format's own ggml type (Q4_K, ...), or
                   I8 for s2conv's private layouts (decoded through `s2conv.format.<tensor>` metadata)
      lossless:    True when dequantize(quantize(w)) == w for every float32 w representable in the format's dtype
      kernel:      the key of a fused runtime kernel for this format, or None
      code_group:  > 0 when every weight is scale * integer code (- min), one scale (and min) per `code_group`
                   consecutive columns: `integer_codes_torch` then returns those pieces (what the runtime's
                   integer kernels are repacked from); 0 for formats of another form (floats, lookup tables)
    """

    name: ClassVar[str]
    block_size: ClassVar[int] = 1
    type_size: ClassVar[int] = 4
    row_overhead: ClassVar[int] = 0
    ggml_type: ClassVar[GGMLQuantizationType] = GGMLQuantizationType.I8
    lossless: ClassVar[bool] = False
    kernel: ClassVar[str | None] = None
    code_group: ClassVar[int] = 0

    def __init_subclass__(cls, name: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if name is None:  # an abstract intermediate class
            return
        if name in _REGISTRY:
            raise TypeError(f"quant format {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls()

    # ----- geometry -------------------------------------------------------------------------------------------
    @property
    def is_native(self) -> bool:
        """True when the GGUF tensor type alone describes the data (any GGUF reader can decode it)."""
        return self.ggml_type != GGMLQuantizationType.I8

    def bits_per_weight(self, n_cols: int) -> float:
        return 8.0 * self.row_bytes(n_cols) / n_cols

    def row_bytes(self, n_cols: int) -> int:
        self.check_cols(n_cols)
        return n_cols // self.block_size * self.type_size + self.row_overhead

    def check_cols(self, n_cols: int, tensor: str = "tensor") -> None:
        if n_cols <= 0 or n_cols % self.block_size:
            raise QuantFormatError(
                f"{tensor}: row length {n_cols} is not a multiple of the block size {self.block_size} "
                f"of format {self.name!r}"
            )

    # ----- conversion -----------------------------------------------------------------------------------------
    def quantize(self, w: np.ndarray | torch.Tensor, *, method: str = "search", tensor: str = "tensor") -> np.ndarray:
        """(rows, cols) float -> (rows, row_bytes(cols)) uint8. `method` is "rtn" or "search" where it applies."""
        raise NotImplementedError

    def dequantize(self, data: np.ndarray, n_cols: int) -> np.ndarray:
        """(rows, row_bytes) uint8 -> (rows, n_cols) float32."""
        raise NotImplementedError

    def dequantize_torch(self, data: torch.Tensor, n_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Torch version of `dequantize`, on data's device. Slow fallback through numpy when not overridden."""
        out = self.dequantize(data.cpu().numpy(), n_cols)
        return torch.from_numpy(out).to(device=data.device, dtype=dtype)

    def integer_codes_torch(self, data: torch.Tensor, n_cols: int) -> IntegerCodes | None:
        """The weight as integers on data's device: w[r, c] = scales[r, c // g] * codes[r, c] - mins[r, c // g]
        (g = `code_group`; no mins term when mins is None). None for formats without integer codes."""
        if not self.code_group:
            return None
        rows = data.shape[0]
        blocks = self._torch_blocks(data, n_cols)
        q, scales, mins = self._codes_blocks(blocks)
        two_level = None
        sub_scales = self._sub_scales_blocks(blocks)
        if sub_scales is not None:
            d, dmin, sc, m = sub_scales
            two_level = (((sc.to(torch.int16) & 0xFF) | (m.to(torch.int16) << 8)).reshape(rows, -1),
                         torch.cat([d, dmin], dim=1).reshape(rows, -1, 2))
        return IntegerCodes(q.reshape(rows, n_cols).to(torch.int16), scales.reshape(rows, -1),
                            None if mins is None else mins.reshape(rows, -1), self.code_group, two_level)

    def _torch_blocks(self, data: torch.Tensor, n_cols: int) -> torch.Tensor:
        """(rows, row_bytes(n_cols)) uint8 -> its blocks (n_blocks, type_size), checked (formats with code_group)."""
        raise NotImplementedError

    def _sub_scales_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """K-quants with mins: (d [n_blocks, 1], dmin [n_blocks, 1] float32, sc [n_blocks, S], m [n_blocks, S]
        integers < 256), where `_codes_blocks`' scales are d * sc and its mins dmin * m; None for other formats."""
        return None

    def _codes_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(n_blocks, type_size) uint8 -> integer codes [n_blocks, S, code_group], float32 scales [n_blocks, S]
        and mins [n_blocks, S] or None (w = scale * code - min), for formats with `code_group` > 0; their torch
        dequantizers combine these pieces (`combine_codes`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<QuantFormat {self.name}>"


def get_format(name: str) -> QuantFormat:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise QuantFormatError(f"unknown format {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_formats() -> list[str]:
    return sorted(_REGISTRY)


def format_for_ggml_type(t: GGMLQuantizationType) -> QuantFormat | None:
    """The native format whose GGUF type is `t` (None for I8 and unknown types)."""
    for f in _REGISTRY.values():
        if f.ggml_type == t and f.is_native:
            return f
    return None
