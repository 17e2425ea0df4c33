"""Reading GGUF files: open with one-line errors, typed metadata access, and decoding any tensor to a float array.

Sits at the bottom with schema and quant_formats, so the runtime loader, the converter's inspect/unpack and the
verifier decode tensors the same way. A tensor's format is its ggml type, unless `s2conv.format.<name>` says it holds
the raw bytes of one of s2conv's own block formats (docs/formats.md); then `s2conv.shape.<name>` gives its shape.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderTensor

from s2conv.errors import GGUFFormatError, SchemaError
from s2conv.gguf_check import check_gguf
from s2conv.quant_formats import QuantFormat, format_for_ggml_type, get_format
from s2conv.schema import KEY_TENSOR_FORMAT, KEY_TENSOR_SHAPE

_MISSING = object()


class GGUFFile:
    """A memory-mapped GGUF file. `tensors` maps names to gguf-py ReaderTensors (data not read until used)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFFormatError(f"{self.path}: no such file")
        self.layout = check_gguf(self.path)  # bounds every count and offset before gguf-py trusts them
        try:
            self.reader = GGUFReader(self.path, "r")
        except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError, struct/numpy errors on bad files
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors: dict[str, ReaderTensor] = {}
        for t in self.reader.tensors:
            if t.name in self.tensors:
                raise GGUFFormatError(f"{self.path}: duplicate tensor name {t.name!r}")
            self.tensors[t.name] = t

    # ----- metadata -------------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=_MISSING, *, kind: type | None = None):
        """Metadata value of `key` (str, int, float, bool or list), or `default` when absent.

        `kind` checks the Python type (int accepts any integer GGUF type, float any float type)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise SchemaError(f"{self.path.name}: missing metadata key {key!r}")
            return default
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) > 2:
            raise SchemaError(f"{self.path.name}: metadata key {key!r} is a nested array")
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.BOOL:
            value = bool(value)
        if kind is not None:
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise SchemaError(f"{self.path.name}: metadata key {key!r} is {type(value).__name__}, "
                                  f"expected {kind.__name__}")
        return value

    def keys(self) -> list[str]:
        return list(self.reader.fields)

    # ----- tensors --------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> ReaderTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise SchemaError(f"{self.path.name}: missing tensor {name!r}") from None

    def tensor_format(self, name: str) -> QuantFormat:
        """The format that decodes this tensor's bytes."""
        t = self.tensor(name)
        fmt_name = self.get(KEY_TENSOR_FORMAT.format(name=name), None)
        if fmt_name is not None:
            if t.tensor_type != GGMLQuantizationType.I8:
                raise SchemaError(f"{name}: s2conv format {fmt_name!r} must be stored as I8, found "
                                  f"{t.tensor_type.name}")
            return get_format(str(fmt_name))
        fmt = format_for_ggml_type(t.tensor_type)
        if fmt is None:
            raise SchemaError(f"{name}: tensor type {t.tensor_type.name} has no decoder in s2conv")
        return fmt

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Logical PyTorch shape (outermost first)."""
        t = self.tensor(name)
        key = KEY_TENSOR_SHAPE.format(name=name)
        if self.has(key):
            shape = tuple(int(d) for d in self.get(key))
            fmt = self.tensor_format(name)
            rows, cols = math.prod(shape[:-1]), shape[-1]
            if int(t.n_bytes) != rows * fmt.row_bytes(cols):
                raise SchemaError(f"{name}: {t.n_bytes} bytes do not hold shape {list(shape)} in format {fmt.name}")
            return shape
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def tensor_rows(self, name: str) -> tuple[np.ndarray, int]:
        """Raw bytes as a (rows, row_bytes) uint8 array (a view of the mapped file) and the row length."""
        shape = self.tensor_shape(name)
        fmt = self.tensor_format(name)
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        raw = np.asarray(self.tensor(name).data).reshape(-1).view(np.uint8)
        expected = rows * fmt.row_bytes(cols)
        if raw.size != expected:
            raise GGUFFormatError(f"{name}: {raw.size} bytes in the file, {expected} expected for {list(shape)} "
                                  f"{fmt.name}")
        return raw.reshape(rows, -1), cols

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        """The tensor decoded to `dtype` in its logical shape."""
        shape = self.tensor_shape(name)
        fmt = self.tensor_format(name)
        rows, cols = self.tensor_rows(name)
        data = torch.from_numpy(np.array(rows)).to(device)  # a copy: the mapped file is read-only
        return fmt.dequantize_torch(data, cols, dtype=dtype).reshape(shape)
