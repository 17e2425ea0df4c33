"""`s2conv unpack`: an s2conv GGUF back to the released checkpoint layout.

Writes config.json (verbatim from s2conv.hf_config), tokenizer.json (from tokenizer.huggingface.json), the model as
bf16 safetensors shards in the release's names plus their index, and codec.pth (fp32) in the release's mixed
weight-norm naming. Folded weights are un-folded as g = ||W|| per output row (dim 0) and v = W, so g * v / ||v||
gives W back. Tensors are dequantized one at a time; the directory appears only when complete.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from s2conv.checkpoint.safetensors_io import write_safetensors
from s2conv.codec_schema import (
    codec_config_from_shapes, codec_tensor_shapes, fold_weight_norm_name, is_weight_norm_g, is_weight_norm_v,
)
from s2conv.converter.atomic import AtomicDir, os_error, sigterm_as_interrupt
from s2conv.converter.inspect_gguf import field_value, open_gguf
from s2conv.errors import ConversionError, SchemaError
from s2conv.quant_formats import format_for_ggml_type, get_format
from s2conv.schema import CODEC_GGUF_PREFIX, KEY_HF_CONFIG, KEY_TENSOR_FORMAT, KEY_TENSOR_SHAPE, model_to_hf_name

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 10**9  # the release's shard size limit (model-00001 is 4.99 GB)


@dataclass
class UnpackResult:
    path: Path
    n_model: int
    n_codec: int


def dequantize_tensor(reader, t) -> torch.Tensor:
    """One GGUF tensor -> float32 torch tensor of its logical PyTorch shape (I8 tensors through s2conv keys)."""
    raw = np.array(reader.data[t.data_offset: t.data_offset + t.n_bytes], dtype=np.uint8)  # writable copy
    fmt_name = field_value(reader, KEY_TENSOR_FORMAT.format(name=t.name))
    if fmt_name is not None:
        shape = tuple(int(x) for x in field_value(reader, KEY_TENSOR_SHAPE.format(name=t.name), []))
        if not shape:
            raise SchemaError(f"tensor {t.name!r}: {KEY_TENSOR_FORMAT.format(name=t.name)} without its shape key")
        fmt = get_format(fmt_name)
    else:
        shape = tuple(int(x) for x in reversed(t.shape))
        fmt = format_for_ggml_type(t.tensor_type)
        if fmt is None:
            raise SchemaError(f"tensor {t.name!r}: no s2conv decoder for GGUF type {t.tensor_type.name}")
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    data = fmt.dequantize(raw.reshape(rows, -1), shape[-1])
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(shape)


def _unfold(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (g [dim0, 1, ..., 1], v = W) with g = ||W|| over all dims but 0."""
    g = w.reshape(w.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    return g, w.clone()


def unpack_gguf(path: Path | str, out_dir: Path | str, force: bool = False) -> UnpackResult:
    """Write the released checkpoint layout of the s2conv GGUF `path` into the new directory `out_dir`."""
    path, out_dir = Path(path), Path(out_dir)
    reader = open_gguf(path)
    hf_text = field_value(reader, KEY_HF_CONFIG)
    if hf_text is None:
        raise SchemaError(f"{path}: no {KEY_HF_CONFIG} key; unpack needs a file written by s2conv export")
    tensors = {t.name: t for t in reader.tensors}
    model = [n for n in tensors if not n.startswith(CODEC_GGUF_PREFIX)]
    codec = [n for n in tensors if n.startswith(CODEC_GGUF_PREFIX)]
    try:
        with sigterm_as_interrupt(), AtomicDir(out_dir, force) as tmp:  # SIGTERM also removes the temporary dir
            (tmp / "config.json").write_text(hf_text, encoding="utf-8")
            tok = field_value(reader, "tokenizer.huggingface.json")
            if tok is not None:
                (tmp / "tokenizer.json").write_text(tok, encoding="utf-8")
            _write_model(reader, tensors, model, tmp)
            if codec:
                _write_codec(reader, tensors, codec, tmp / "codec.pth")
    except OSError as e:
        raise os_error("cannot write", out_dir, e) from None
    return UnpackResult(out_dir, len(model), len(codec))


def _write_model(reader, tensors: dict, names: list[str], out: Path) -> None:
    """bf16 safetensors shards (<= SHARD_BYTES each, GGUF order) and model.safetensors.index.json."""
    hf = {n: model_to_hf_name(n) for n in names}
    shapes = {}
    for n in names:
        key = KEY_TENSOR_SHAPE.format(name=n)
        s = field_value(reader, key)
        shapes[n] = tuple(int(x) for x in s) if s else tuple(int(x) for x in reversed(tensors[n].shape))
    shards, acc = [[]], 0
    for n in names:
        nbytes = 2 * math.prod(shapes[n])
        if shards[-1] and acc + nbytes > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append(n)
        acc += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    by_hf = {hf[n]: n for n in names}

    def produce(hf_name: str):
        yield dequantize_tensor(reader, tensors[by_hf[hf_name]]).to(torch.bfloat16)

    total = 0
    for shard, fname in zip(shards, files):
        total += write_safetensors(out / fname, [(hf[n], "BF16", shapes[n]) for n in shard], produce)
    index = {"metadata": {"total_parameters": total // 2, "total_size": total},
             "weight_map": dict(sorted((hf[n], files[i]) for i, s in enumerate(shards) for n in s))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_codec(reader, tensors: dict, names: list[str], out: Path) -> None:
    """codec.pth (fp32, release names, release order): weight-norm pairs restored from the folded weights."""
    folded = {n[len(CODEC_GGUF_PREFIX):]: n for n in names}
    shapes = {k: tuple(int(x) for x in reversed(tensors[v].shape)) for k, v in folded.items()}
    release = codec_tensor_shapes(codec_config_from_shapes(shapes))
    g_of = {fold_weight_norm_name(g): g for g in release if is_weight_norm_g(g)}
    sd: dict[str, torch.Tensor] = {}
    for name in release:
        base = fold_weight_norm_name(name)
        if base not in folded:
            raise SchemaError(f"codec tensor {CODEC_GGUF_PREFIX + base!r} missing from the GGUF")
        if is_weight_norm_g(name):
            continue  # written together with its v
        w = dequantize_tensor(reader, tensors[folded[base]])
        if is_weight_norm_v(name):
            sd[g_of[base]], sd[name] = _unfold(w)
        else:
            sd[name] = w
    ordered = {n: sd[n] for n in release}
    try:
        torch.save(ordered, out)
    except RuntimeError as e:  # torch's zip writer reports a failed write (full disk, size limit) as RuntimeError
        raise ConversionError(f"cannot write {out.name}: torch.save failed ({str(e).strip().splitlines()[-1]}); "
                              "is the disk full?") from None
