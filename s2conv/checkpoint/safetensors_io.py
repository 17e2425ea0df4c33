"""Minimal safetensors header reading and a streaming writer (one tensor in memory at a time).

File layout: u64 little-endian header length N, N bytes of JSON header
`{"__metadata__": {...}, name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}` padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes; offsets are relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from s2conv.errors import CheckpointError

DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header without reading tensor data.

    Returns (tensors: name -> {"dtype", "shape", "data_offsets"}, data_start). Raises CheckpointError when the
    header is malformed, offsets overlap or leave gaps, or the file is shorter or longer than the header promises.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path.name}: truncated safetensors header (promises {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path.name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: malformed header entry for {name!r}") from None
        # JSON can say anything: offsets and dims must be non-negative integers (bool is an int in Python)
        if not all(type(x) is int and x >= 0 for x in (b, e, *shape)) or not isinstance(dtype, str):
            raise CheckpointError(f"{path.name}: tensor {name!r} has invalid dtype, shape or offsets "
                                  f"({str(dtype)[:20]}, shape {str(shape)[:60]}, "
                                  f"offsets {str(info['data_offsets'])[:60]})")
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if e - b != math.prod(shape) * DTYPE_SIZES[dtype] or b < 0:
            raise CheckpointError(f"{path.name}: tensor {name!r} offsets [{b}, {e}] do not match {dtype}{shape}")
        spans.append((b, e, name))
        end = max(end, e)
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            raise CheckpointError(f"{path.name}: tensor {name!r} data starts at {b}, expected {pos} (gap or overlap)")
        pos = e
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path.name}: truncated or padded safetensors file: header promises {8 + n + end} bytes, file has {size}")
    return header, 8 + n


def write_safetensors(path: Path, specs: Iterable[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[str], Iterable[bytes | np.ndarray | torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file, producing each tensor's bytes only when it is written.

    specs: (name, dtype code such as "BF16", shape). Tensors are laid out sorted by name (what the safetensors
    library does for one dtype). produce(name) yields the tensor's bytes in row-major order, in chunks of any size
    (bytes, numpy arrays or CPU tensors, whose raw memory is written). Returns the number of data bytes.
    """
    specs = sorted(specs)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in specs:
            want = math.prod(shape) * DTYPE_SIZES[dtype]
            got = 0
            for chunk in produce(name):
                buf = _as_bytes(chunk)
                f.write(buf)
                got += len(buf)
            if got != want:
                raise ValueError(f"write_safetensors: {name} produced {got} bytes, expected {want}")
    return offset


def _as_bytes(chunk) -> memoryview | bytes:
    if isinstance(chunk, torch.Tensor):
        t = chunk.contiguous()
        # numpy has no bfloat16: reinterpret the raw 2-byte words
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        return memoryview(t.numpy()).cast("B")
    if isinstance(chunk, np.ndarray):
        return memoryview(np.ascontiguousarray(chunk)).cast("B")
    return chunk
