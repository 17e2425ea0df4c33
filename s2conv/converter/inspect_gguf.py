"""`s2conv inspect`: what a GGUF file holds (metadata, tensors, sizes per component), for any GGUF file.

`open_gguf` wraps gguf-py's reader so every parse failure becomes one GGUFFormatError line. `inspect_gguf` returns
plain data (JSON-ready); `format_inspect` renders it as text. The ggml C loader's extra rules (name length, dims,
nested arrays, block divisibility) are reported as `problems`, since gguf-py does not check them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from s2conv.converter.plan import COMPONENTS, GGML_MAX_DIMS, GGML_MAX_NAME
from s2conv.errors import GGUFFormatError
from s2conv.gguf_check import check_gguf
from s2conv.schema import ARCH, KEY_TENSOR_FORMAT, KEY_TENSOR_SHAPE, component_of

MAX_LIST = 8  # array elements shown unless full=True
MAX_TEXT = 200  # string characters shown unless full=True


def open_gguf(path: Path | str) -> GGUFReader:
    """gguf-py's reader, with every parse error turned into a one-line GGUFFormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such file")
    check_gguf(path)  # counts, lengths, offsets and the C loader's rules, before gguf-py reads anything
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct/numpy errors, IndexError... on malformed files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFFormatError(f"{path}: not a valid GGUF file ({msg})") from None


def field_value(reader: GGUFReader, key: str, default=None):
    """A metadata value as a Python scalar, str or list; `default` when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        v = f.contents()
    except Exception as e:  # a malformed value
        raise GGUFFormatError(f"metadata key {key!r} cannot be decoded ({e})") from None
    return v.item() if isinstance(v, np.generic) else v


def _type_name(f) -> str:
    t = [GGUFValueType(x).name for x in f.types]
    return t[0] if len(t) == 1 else f"{t[0]}[{','.join(t[1:])}]"


def _short(v, full: bool):
    if full:
        return v
    if isinstance(v, str) and len(v) > MAX_TEXT:
        return v[:MAX_TEXT] + f"... ({len(v)} chars)"
    if isinstance(v, list) and len(v) > MAX_LIST:
        return [_short(x, full) for x in v[:MAX_LIST]] + [f"... ({len(v)} items)"]
    return v


def inspect_gguf(path: Path | str, full: bool = False) -> dict:
    """{path, file_bytes, version, alignment, data_offset, metadata: [{key, type, value}],
    tensors: [{name, type, shape (PyTorch order), bytes, offset, component, format}], summary, problems}."""
    reader = open_gguf(path)
    meta, problems = [], []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(f.types) > 2 and f.types[1] == GGUFValueType.ARRAY:
            problems.append(f"metadata {key!r} is a nested array (the ggml C loader rejects it)")
        meta.append(dict(key=key, type=_type_name(f), value=_short(field_value(reader, key), full)))
    is_s2 = field_value(reader, "general.architecture") == ARCH
    tensors = []
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]
        shape = list(reversed(ne))
        fmt = field_value(reader, KEY_TENSOR_FORMAT.format(name=t.name)) or t.tensor_type.name.lower()
        logical = field_value(reader, KEY_TENSOR_SHAPE.format(name=t.name))
        tensors.append(dict(
            name=t.name, type=t.tensor_type.name, shape=[int(x) for x in logical] if logical else shape,
            bytes=int(t.n_bytes), offset=int(t.data_offset), format=fmt,
            component=component_of(t.name) if is_s2 else "all",
        ))
        problems += _tensor_problems(t.name, t.tensor_type, ne)
    return dict(
        path=str(path), file_bytes=Path(path).stat().st_size, version=int(field_value(reader, "GGUF.version", 0)),
        alignment=int(reader.alignment), data_offset=int(reader.data_offset), metadata=meta, tensors=tensors,
        summary=_summary(tensors), problems=problems,
    )


def _tensor_problems(name: str, qtype: GGMLQuantizationType, ne: list[int]) -> list[str]:
    out = []
    if len(name.encode()) > GGML_MAX_NAME:
        out.append(f"tensor {name!r}: name longer than {GGML_MAX_NAME} bytes")
    if len(ne) > GGML_MAX_DIMS:
        out.append(f"tensor {name!r}: {len(ne)} dims (ggml allows {GGML_MAX_DIMS})")
    block = GGML_QUANT_SIZES.get(qtype, (1, 1))[0]
    if ne and ne[0] % block:
        out.append(f"tensor {name!r}: row length {ne[0]} not a multiple of block {block} of {qtype.name}")
    return out


def _summary(tensors: list[dict]) -> dict:
    out = {}
    for comp in COMPONENTS + ("all", "total"):
        sel = [t for t in tensors if comp == "total" or t["component"] == comp]
        if not sel or (comp == "total" and len(out) == 1):
            continue
        params = sum(math.prod(t["shape"]) for t in sel)
        nbytes = sum(t["bytes"] for t in sel)
        out[comp] = dict(tensors=len(sel), params=params, bytes=nbytes, bpw=8.0 * nbytes / params if params else 0.0)
    return out


def format_inspect(info: dict) -> str:
    """Text report: file facts, metadata (values shortened), tensor table, per-component summary, problems."""
    lines = [f"{info['path']}: GGUF v{info['version']}, {info['file_bytes']:,} bytes, {len(info['tensors'])} tensors, "
             f"{len(info['metadata'])} keys, alignment {info['alignment']}", "", "metadata:"]
    for m in info["metadata"]:
        v = m["value"]
        lines.append(f"  {m['key']} ({m['type']}) = {v}")
    lines += ["", "tensors:"]
    w = max((len(t["name"]) for t in info["tensors"]), default=4)
    lines.append(f"  {'name':<{w}}  {'type':<6} {'format':<7} {'shape':<22} {'bytes':>12}")
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"  {t['name']:<{w}}  {t['type']:<6} {t['format']:<7} {shape:<22} {t['bytes']:>12,}")
    lines += ["", f"  {'component':<11} {'tensors':>7} {'params':>14} {'MiB':>11} {'bpw':>7}"]
    for comp, s in info["summary"].items():
        lines.append(f"  {comp:<11} {s['tensors']:>7} {s['params']:>14,} {s['bytes'] / 2**20:>11.2f} {s['bpw']:>7.3f}")
    if info["problems"]:
        lines += ["", "problems (the ggml C loader would reject the file):"] + [f"  {p}" for p in info["problems"]]
    return "\n".join(lines)
