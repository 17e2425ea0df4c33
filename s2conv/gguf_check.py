"""Streaming validation of a GGUF file's structure, run before gguf-py (or anything else) parses it.

gguf-py's GGUFReader trusts the file: a count or length read from the header can make it allocate huge arrays, loop
for hours or raise arbitrary exceptions. `check_gguf` walks the header with `struct` over a memory map, checks every
count and length against the bytes that remain *before* using it, and enforces the rules of llama.cpp's C loader
(gguf.cpp), so a file it accepts is one both readers accept. Any problem is one GGUFFormatError line.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from s2conv.errors import GGUFFormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # gguf-py reads both; the C loader refuses 1 and anything above 3
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 63  # GGML_MAX_NAME = 64 counts the NUL terminator
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH in gguf.cpp
MAX_ARRAY_ITEMS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS in gguf.cpp
INT64_MAX = (1 << 63) - 1
HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, KV count
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a non-empty key, value type, the smallest value (one UINT8 byte)
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims (may be 0), type, offset

# GGUF value type id -> (name, byte size of a scalar; 0 = variable)
VALUE_TYPES = {0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4),
               5: ("INT32", 4), 6: ("FLOAT32", 4), 7: ("BOOL", 1), 8: ("STRING", 0), 9: ("ARRAY", 0),
               10: ("UINT64", 8), 11: ("INT64", 8), 12: ("FLOAT64", 8)}
STRING, ARRAY, UINT32 = 8, 9, 4

_U32, _U64, _I64 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<q")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info record. ne is in ggml order (ne[0] contiguous); offset is relative to the data section."""

    name: str
    ggml_type: int
    ne: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class GGUFLayout:
    """What a valid header says: `kv_types` maps each key to its type ids (ARRAY followed by the element type)."""

    path: Path
    version: int
    file_bytes: int
    alignment: int
    data_offset: int  # absolute file offset of the data section
    data_bytes: int  # size of the data section, every tensor padded to the alignment
    kv_types: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)


class _Cursor:
    """Sequential little-endian reads from a buffer; every read checks the bytes left first."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, problem: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {problem}")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has {self.left()} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def i64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _I64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, max_bytes: int = MAX_STRING_BYTES) -> str:
        """A gguf string (u64 length + UTF-8 bytes), its length checked against the limit and the file first."""
        n = self.u64(f"length of {what}")
        if n > max_bytes:
            raise self.fail(f"{what} is {n} bytes long, more than the limit of {max_bytes}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]  # bounded by the file size (checked above)
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - n} is not valid UTF-8") from None


def check_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Validate the GGUF file at `path` without trusting any count in it; return its layout.

    Byte layout checked (GGUF v2/v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 KV count,
    KV pairs (gguf string key, u32 type, value), tensor infos (gguf string name, u32 n_dims, n_dims x u64 ne,
    u32 ggml type, u64 offset), zero padding to `general.alignment`, then each tensor's data padded to the alignment.
    Raises GGUFFormatError (one line naming the file and the problem) on the first violation.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise GGUFFormatError(f"{path}: not a regular file")
        with open(path, "rb") as fh:
            if size < HEADER_BYTES:
                raise GGUFFormatError(f"{path}: truncated: {size} bytes, a GGUF header needs {HEADER_BYTES}")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _check(_Cursor(mm, len(mm), path))  # slices of an mmap are copies: nothing pins the map
    except FileNotFoundError:
        raise GGUFFormatError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # unreadable, or the file shrank while mapping it
        raise GGUFFormatError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _check(c: _Cursor) -> GGUFLayout:
    magic = bytes(c.buf[0:4])
    if magic != MAGIC:
        raise c.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    c.pos = 4
    version = c.u32("version")
    if version & 0xFFFF == 0 and version:
        raise c.fail(f"version field {version:#x}: a big-endian (byte-swapped) GGUF, which is not supported")
    if version not in VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (expected one of {list(VERSIONS)})")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("KV count")
    # Bound both counts by the bytes left before looping over them: every record has a minimum size.
    if n_kv > c.left() // MIN_KV_BYTES:
        raise c.fail(f"KV count {n_kv} cannot fit in the {c.left()} bytes left "
                     f"(each KV pair needs at least {MIN_KV_BYTES})")
    if n_tensors > (c.left() - n_kv * MIN_KV_BYTES) // MIN_TENSOR_INFO_BYTES:
        raise c.fail(f"tensor count {n_tensors} cannot fit in the {c.left()} bytes left "
                     f"(each tensor info needs at least {MIN_TENSOR_INFO_BYTES})")
    layout = GGUFLayout(c.path, version, c.size, DEFAULT_ALIGNMENT, 0, 0)
    for i in range(n_kv):
        _check_kv(c, i, layout)
    _check_alignment(c, layout)
    names: set[str] = set()
    for i in range(n_tensors):
        layout.tensors.append(_check_tensor_info(c, i, names))
    layout.data_offset = -(-c.pos // layout.alignment) * layout.alignment if n_tensors else c.pos
    if layout.data_offset > c.size:
        raise c.fail(f"truncated: data section starts at offset {layout.data_offset}, past the end ({c.size} bytes)")
    _check_offsets(c, layout)
    return layout


def _check_kv(c: _Cursor, i: int, layout: GGUFLayout) -> None:
    key = c.string(f"key of KV pair {i}")
    if not key:
        raise c.fail(f"KV pair {i} has an empty key")
    if key in layout.kv_types:
        raise c.fail(f"duplicate metadata key {key!r}")
    if key.startswith("GGUF."):  # gguf-py reserves these names for the header fields
        raise c.fail(f"metadata key {key!r} uses the reserved prefix 'GGUF.'")
    vtype = c.u32(f"value type of {key!r}")
    if vtype not in VALUE_TYPES:
        raise c.fail(f"metadata key {key!r} has unknown value type {vtype}")
    if vtype != ARRAY:
        if key == "general.alignment" and vtype == UINT32:
            layout.alignment = c.u32(f"value of {key!r}")
        else:
            _skip_value(c, key, vtype)
        layout.kv_types[key] = (vtype,)
        return
    etype = c.u32(f"element type of {key!r}")
    if etype == ARRAY:
        raise c.fail(f"metadata key {key!r} is a nested array (the ggml C loader rejects them)")
    if etype not in VALUE_TYPES:
        raise c.fail(f"metadata key {key!r} is an array of unknown value type {etype}")
    count = c.u64(f"element count of {key!r}")
    if count > MAX_ARRAY_ITEMS:
        raise c.fail(f"metadata key {key!r} has {count} elements, more than the limit of {MAX_ARRAY_ITEMS}")
    item = VALUE_TYPES[etype][1] or 8  # a string needs at least its 8-byte length
    if count > c.left() // item:
        raise c.fail(f"metadata key {key!r}: {count} elements of {VALUE_TYPES[etype][0]} cannot fit in the "
                     f"{c.left()} bytes left")
    if etype == STRING:
        for j in range(count):
            c.string(f"element {j} of {key!r}")
    else:
        c.pos += count * item
    layout.kv_types[key] = (ARRAY, etype)


def _skip_value(c: _Cursor, key: str, vtype: int) -> None:
    if vtype == STRING:
        c.string(f"value of {key!r}")
        return
    n = VALUE_TYPES[vtype][1]
    c.need(n, f"value of {key!r}")
    c.pos += n


def _check_alignment(c: _Cursor, layout: GGUFLayout) -> None:
    types = layout.kv_types.get("general.alignment")
    if types is not None and types != (UINT32,):
        names = "[".join(VALUE_TYPES[t][0] for t in types) + "]" * (len(types) - 1)
        raise c.fail(f"general.alignment is {names}, expected UINT32")
    a = layout.alignment
    if a == 0 or a & (a - 1):
        raise c.fail(f"general.alignment is {a}, expected a power of two")


def _check_tensor_info(c: _Cursor, i: int, names: set[str]) -> TensorInfo:
    name = c.string(f"name of tensor {i}", max_bytes=MAX_STRING_BYTES)
    nb = len(name.encode("utf-8"))
    if nb > MAX_NAME_BYTES:
        raise c.fail(f"tensor {i} name {name[:40]!r}... is {nb} bytes, more than ggml's {MAX_NAME_BYTES}")
    if "\0" in name:
        raise c.fail(f"tensor {i} name {name!r} contains a NUL byte")
    if name in names:
        raise c.fail(f"duplicate tensor name {name!r}")
    names.add(name)
    n_dims = c.u32(f"n_dims of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise c.fail(f"tensor {name!r} has {n_dims} dimensions, ggml allows {MAX_DIMS}")
    ne = tuple(c.i64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
    if any(d < 0 for d in ne):
        raise c.fail(f"tensor {name!r} has a negative dimension in {list(ne)}")
    # the C loader's overflow test: every partial product of ne (padded with 1s to 4 dims) must stay < INT64_MAX
    ne4 = ne + (1,) * (MAX_DIMS - n_dims)
    if all(ne4):
        prod = ne4[0]
        for d in ne4[1:]:
            if INT64_MAX // d <= prod:
                raise c.fail(f"tensor {name!r} shape {list(ne)}: element count overflows int64")
            prod *= d
    type_id = c.u32(f"type of tensor {name!r}")
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise c.fail(f"tensor {name!r} has unknown ggml type id {type_id}") from None
    n_el = 1
    for d in ne4:
        n_el *= d
    if block <= 0 or ne4[0] % block:
        raise c.fail(f"tensor {name!r} of type {qtype.name}: row length {ne4[0]} is not a multiple of the block "
                     f"size {block}")
    nbytes = n_el // block * type_size
    if nbytes > INT64_MAX:
        raise c.fail(f"tensor {name!r} shape {list(ne)} {qtype.name}: byte size overflows int64")
    offset = c.u64(f"data offset of tensor {name!r}")
    return TensorInfo(name, type_id, ne, offset, nbytes)


def _check_offsets(c: _Cursor, layout: GGUFLayout) -> None:
    """Tensor data must be exactly contiguous in info order, each tensor padded to the alignment (gguf.cpp's rule),
    and the whole padded data section must lie inside the file."""
    a = layout.alignment
    expected = 0
    for t in layout.tensors:
        if t.offset != expected:
            kind = "overlaps the previous tensor" if t.offset < expected else "leaves a gap or is misaligned"
            raise c.fail(f"tensor {t.name!r} has data offset {t.offset}, expected {expected} ({kind})")
        expected += -(-t.nbytes // a) * a
    layout.data_bytes = expected
    end = layout.data_offset + expected
    if end > c.size:
        raise c.fail(f"truncated: tensor data ends at offset {end}, the file has {c.size} bytes")
