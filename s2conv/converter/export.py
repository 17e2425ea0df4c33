"""`s2conv export`: checkpoint directory -> one GGUF file (AR model + codec), streamed tensor by tensor.

The plan (plan.py) fixes every tensor's format and size first; GGUFWriter then writes the header, metadata and all
tensor infos, and the data follows in plan order, quantized in row chunks by a worker thread while the main thread
writes the previous chunk. Memory stays flat (a few chunks of ~16 M elements), the bytes do not depend on the
thread count, and the file only appears at the output path once complete (atomic.py).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from s2conv.codec_schema import codec_config_from_shapes, fold_weight_norm, is_transposed_conv
from s2conv.converter.atomic import AtomicFile, check_target, os_error, sigterm_as_interrupt
from s2conv.converter.metadata import (
    KV, check_kvs, codec_kvs, general_kvs, model_kvs, s2conv_kvs, tokenizer_kvs,
)
from s2conv.converter.plan import (
    PlanRow, SourceTensor, build_plan, codec_sources, model_sources, summarize,
)
from s2conv.converter.policy import ModelDims, Policy
from s2conv.errors import ConversionError
from s2conv.quant_formats import get_format
from s2conv.schema import ARCH

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of about 16 M elements (64 MiB as float32)
ALIGNMENT = 32  # GGUF default; not written as a key
HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count


@dataclass
class ExportPlan:
    """Everything the export will write, computed without touching tensor data."""

    rows: list[PlanRow]
    kvs: list[KV]
    summary: dict
    file_bytes: int  # exact size of the file that export writes
    policy: Policy


@dataclass
class ExportResult:
    path: Path
    plan: ExportPlan
    seconds: float
    tokenizer_json: Path | None


def checkpoint_sources(ckpt) -> list[SourceTensor]:
    """The tensors of an opened checkpoint, model first (release order), then the codec with weight norm folded."""
    model = model_sources(ckpt.model_names(), ckpt.model_shape, ckpt.model_dtype)
    codec = codec_sources(ckpt.codec_names(), ckpt.codec_shape, lambda n: ckpt.codec_tensor(n).dtype)
    return model + codec


def metadata_for(ckpt, rows: list[PlanRow], policy: Policy, model_dir: Path | None,
                 source_hash: str | None = None, name: str = "Fish Audio S2 Pro") -> list[KV]:
    """All metadata of the file, in write order. config.json is kept verbatim when the directory has one."""
    cfg = ckpt.config
    cc = getattr(ckpt, "codec_config", None) or codec_config_from_shapes(
        {n: ckpt.codec_shape(n) for n in ckpt.codec_names()})
    hf_path = Path(model_dir) / "config.json" if model_dir is not None else None
    if hf_path is not None and hf_path.is_file():
        hf = hf_path.read_text(encoding="utf-8")
    else:
        hf = json.dumps(cfg.to_hf_config(), indent=2) + "\n"
    kvs = general_kvs(name, policy.file_type) + model_kvs(cfg) + codec_kvs(cc)
    tok = getattr(ckpt, "tokenizer_path", None)
    if tok is not None and Path(tok).is_file():
        kvs += tokenizer_kvs(Path(tok), cfg)
    kvs += s2conv_kvs(policy.to_json(), source_hash if source_hash is not None else ckpt.content_hash(), hf, rows)
    check_kvs(kvs)
    return kvs


def file_size(rows: list[PlanRow], kvs: list[KV]) -> int:
    """Exact size of the GGUF file: header, metadata, tensor infos, padding, padded tensor data."""
    meta = HEADER_BYTES + sum(kv.nbytes() for kv in kvs)
    meta += sum(8 + len(r.name.encode()) + 4 + 8 * len(r.stored_shape) + 4 + 8 for r in rows)
    data = sum(_pad(r.nbytes) for r in rows)
    return _pad(meta) + data


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def plan_export(ckpt, policy: Policy, model_dir: Path | None = None,
                source_hash: str | None = None) -> ExportPlan:
    """Plan an export of an opened checkpoint (`s2conv.checkpoint.open_checkpoint`) without reading tensor data
    (except the content hash, unless `source_hash` is given)."""
    policy = replace(policy, dims=ModelDims.from_config(ckpt.config))
    rows = build_plan(checkpoint_sources(ckpt), policy)
    kvs = metadata_for(ckpt, rows, policy, model_dir, source_hash)
    return ExportPlan(rows, kvs, summarize(rows), file_size(rows, kvs), policy)


# ---------------------------------------------------------------------------------------------------------------
# Tensor data
# ---------------------------------------------------------------------------------------------------------------


def _source_tensor(ckpt, row: PlanRow) -> torch.Tensor:
    """The float tensor to store for a plan row (weight norm folded in fp32 for codec_wn rows)."""
    if row.kind == "model":
        return ckpt.model_tensor(row.sources[0])
    if row.kind == "codec":
        return ckpt.codec_tensor(row.sources[0])
    g, v = (ckpt.codec_tensor(n) for n in row.sources)
    return fold_weight_norm(g, v, transposed=is_transposed_conv(row.sources[1]))


def encode_chunks(ckpt, row: PlanRow) -> Iterator[np.ndarray]:
    """The stored bytes of one tensor, as (n, row_bytes) uint8 arrays over consecutive row ranges."""
    t = _source_tensor(ckpt, row)
    if tuple(t.shape) != row.shape and not (row.shape == (1,) and t.dim() == 0):
        raise ConversionError(f"tensor {row.name!r}: checkpoint shape {tuple(t.shape)} != planned {row.shape}")
    t2 = t.reshape(row.rows, row.cols)
    fmt = get_format(row.format)
    step = max(1, CHUNK_ELEMENTS // row.cols)
    for r0 in range(0, row.rows, step):
        part = t2[r0:r0 + step]
        if part.dtype != torch.float32:
            part = part.float()
        data = fmt.quantize(part, tensor=row.name)
        if row.stored != row.format:
            from s2conv.quant_formats.compat import to_compat

            data = to_compat(row.format, data, row.cols)
        yield np.ascontiguousarray(data, dtype=np.uint8)


_DONE = object()


def _produce(ckpt, rows: list[PlanRow], out: queue.Queue, stop: threading.Event) -> None:
    """Worker: encode every row's chunks in order into `out`; an exception is forwarded to the writer."""
    try:
        for i, row in enumerate(rows):
            for chunk in encode_chunks(ckpt, row):
                while not stop.is_set():
                    try:
                        out.put((i, chunk), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        out.put((len(rows), _DONE))
    except BaseException as e:  # forwarded and re-raised by the writer thread
        out.put((-1, e))


def iter_encoded(ckpt, rows: list[PlanRow], threads: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """(row index, chunk bytes) in plan order; with threads >= 2 encoding runs one step ahead in a worker."""
    if threads < 2:
        for i, row in enumerate(rows):
            for chunk in encode_chunks(ckpt, row):
                yield i, chunk
        return
    q: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(ckpt, rows, q, stop), name="s2conv-encode", daemon=True)
    worker.start()
    try:
        while True:
            i, item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        stop.set()
        worker.join(timeout=5)


def _write(f, buf) -> None:
    """All file data goes through here (tests replace it to simulate a full disk)."""
    f.write(buf)


# ---------------------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------------------


def export_gguf(model_path: Path | str, out: Path | str, policy: Policy, *, force: bool = False,
                threads: int = 2, progress: bool = False, tokenizer_json: bool = True,
                ckpt=None) -> ExportResult:
    """Export the checkpoint at `model_path` to the GGUF file `out` (see the module docstring).

    Writes `tokenizer.json` next to `out` too (s2.cpp reads it from there) unless `tokenizer_json` is False.
    Raises ConversionError (and CheckpointError / QuantFormatError from below) with one-line messages; on any
    failure or interrupt no file is left at `out` and no temporary file anywhere.
    """
    from s2conv.checkpoint import open_checkpoint

    out = Path(out)
    check_target(out, force)
    t0 = time.perf_counter()
    ckpt = ckpt if ckpt is not None else open_checkpoint(Path(model_path))
    plan = plan_export(ckpt, policy, Path(model_path))
    tok_src = getattr(ckpt, "tokenizer_path", None)
    tok_dst = out.parent / "tokenizer.json" if tokenizer_json and tok_src is not None else None
    if tok_dst is not None:
        _check_tokenizer_target(Path(tok_src), tok_dst, force)
    with sigterm_as_interrupt():
        try:
            with AtomicFile(out, force) as af:
                _write_file(af.path, ckpt, plan, threads, progress)
                if tok_dst is not None and not _same_file(Path(tok_src), tok_dst):
                    with AtomicFile(tok_dst, force=True) as tf:
                        with open(tf.path, "wb") as f:
                            _write(f, Path(tok_src).read_bytes())
        except OSError as e:
            raise os_error("cannot write", out, e) from None
    log.info("wrote %s (%d bytes) in %.1f s", out, plan.file_bytes, time.perf_counter() - t0)
    return ExportResult(out, plan, time.perf_counter() - t0, tok_dst)


def _check_tokenizer_target(src: Path, dst: Path, force: bool) -> None:
    if dst.exists() and not force and not _same_file(src, dst):
        raise ConversionError(f"{dst} exists with other content; pass --force or --no-tokenizer-json")


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _write_file(path: str, ckpt, plan: ExportPlan, threads: int, progress: bool) -> None:
    """Header, metadata and tensor infos through GGUFWriter; then the data, chunk by chunk, in plan order."""
    w = GGUFWriter(path=None, arch=ARCH)
    w.kv_data[0].clear()  # keys come from plan.kvs only (general.architecture included), in its order
    for kv in plan.kvs:
        w.add_key_value(kv.key, kv.value, kv.type, kv.sub)
    for r in plan.rows:
        # a non-uint8 dtype makes GGUFWriter take stored_shape as the element shape, which it is
        w.add_tensor_info(r.name, r.stored_shape, np.dtype(np.float32), r.nbytes,
                          raw_dtype=GGMLQuantizationType[r.ggml_type])
    w.write_header_to_file(path=Path(path))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    _write(f, b"\0" * (-f.tell() % ALIGNMENT))
    from tqdm import tqdm

    bar = tqdm(total=sum(r.nbytes for r in plan.rows), unit="B", unit_scale=True, desc="export",
               disable=not progress, leave=False)
    written = [0] * len(plan.rows)
    current = -1
    chunks = iter_encoded(ckpt, plan.rows, threads)
    try:
        for i, chunk in chunks:
            if i != current:
                _finish_row(f, plan.rows, written, current)
                current = i
                bar.set_postfix_str(plan.rows[i].name, refresh=False)
            _write(f, memoryview(chunk).cast("B"))
            written[i] += chunk.nbytes
            bar.update(chunk.nbytes)
        _finish_row(f, plan.rows, written, current)
        for i, r in enumerate(plan.rows):  # rows without data chunks cannot exist, but a short one must not pass
            if written[i] != r.nbytes:
                raise ConversionError(f"tensor {r.name!r}: wrote {written[i]} bytes, planned {r.nbytes}")
        f.flush()
        if f.tell() != plan.file_bytes:
            raise ConversionError(f"{path}: wrote {f.tell()} bytes, planned {plan.file_bytes}")
    finally:
        # stop and join the encoder thread now: left to garbage collection, an interrupted export could reach
        # interpreter shutdown with the thread still inside torch ("terminate called", exit -6 instead of 130)
        chunks.close()
        bar.close()
        w.close()


def _finish_row(f, rows: list[PlanRow], written: list[int], i: int) -> None:
    if i < 0:
        return
    if written[i] != rows[i].nbytes:
        raise ConversionError(f"tensor {rows[i].name!r}: wrote {written[i]} bytes, planned {rows[i].nbytes}")
    _write(f, b"\0" * (-written[i] % ALIGNMENT))
