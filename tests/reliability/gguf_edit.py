"""Test helpers: GGUF files byte by byte (for corruptions gguf-py's writer refuses) and metadata rewrites."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

U8, U32, U64, STR, ARR, F32V = 0, 4, 10, 8, 9, 6


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    """gguf string: u64 length (or a forged one) + bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STR, gstr(value))


def kv_arr(key: str, etype: int, items: bytes, count: int) -> bytes:
    return kv(key, ARR, struct.pack("<IQ", etype, count) + items)


def tensor_info(name: str | bytes, ne: list[int], type_id: int, offset: int, n_dims: int | None = None) -> bytes:
    dims = b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in ne)
    return gstr(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims) + dims + \
        struct.pack("<IQ", type_id, offset)


def build(kvs: list[bytes], infos: list[bytes], data: bytes, *, magic: bytes = b"GGUF", version: int = 3,
          n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


def pad(n: int, a: int = 32) -> int:
    return -(-n // a) * a


# A small valid file: F32 [8], Q4_K [2, 256] (ggml ne (256, 2)), F16 [5, 3]
TENSORS = [("a.weight", [8], int(GGMLQuantizationType.F32), 32),
           ("b.weight", [256, 2], int(GGMLQuantizationType.Q4_K), 2 * 144),
           ("c.weight", [3, 5], int(GGMLQuantizationType.F16), 30)]


def valid_parts(alignment: int = 32):
    """(kvs, infos, data) of a valid file; change one piece to corrupt it."""
    kvs = [kv_str("general.architecture", "test"), kv_u32("general.quantization_version", 2),
           kv_arr("tokenizer.ggml.tokens", STR, gstr("a") + gstr("bc") + gstr("def"), 3)]
    if alignment != 32:
        kvs.append(kv_u32("general.alignment", alignment))
    infos, data, off = [], b"", 0
    rng = np.random.default_rng(0)
    for name, ne, t, nbytes in TENSORS:
        infos.append(tensor_info(name, ne, t, off))
        blob = rng.integers(0, 60, nbytes, dtype=np.uint8).tobytes()  # small bytes: finite f16/f32 values
        data += blob + b"\0" * (pad(nbytes, alignment) - nbytes)
        off += pad(nbytes, alignment)
    return kvs, infos, data


def rewrite(src: Path, dst: Path, *, drop: tuple[str, ...] = (), replace: dict | None = None,
            drop_tensors: tuple[str, ...] = (), tensors: dict | None = None) -> Path:
    """Copy a GGUF through gguf-py with metadata keys dropped or replaced ({key: (value, GGUFValueType[, sub])}),
    tensors dropped or replaced ({name: numpy array}, stored as F32/F16 by dtype)."""
    replace = dict(replace or {})
    r = GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = GGUFWriter(dst, arch)
    w.kv_data[0].clear()
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop:
            continue
        if key in replace:
            value, vtype, *sub = replace.pop(key)
            w.add_key_value(key, value, vtype, sub[0] if sub else None)
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[1]) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
    for key, (value, vtype, *sub) in replace.items():  # new keys
        w.add_key_value(key, value, vtype, sub[0] if sub else None)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        if tensors and t.name in tensors:
            w.add_tensor(t.name, tensors[t.name])
            continue
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)  # uint8 data: gguf-py derives the shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
