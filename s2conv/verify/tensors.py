"""Tensor level of `s2conv verify`: every GGUF tensor decoded and compared with its source checkpoint tensor.

GGUF model tensors carry the model names of the checkpoint (`layers.0.attention.wqkv.weight`); codec tensors are
`c.<folded name>`, compared with the checkpoint's weight-norm pair folded in fp32. One tensor is in memory at a
time (plus its decoded copy).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

import torch

from s2conv.codec_schema import fold_weight_norm, is_transposed_conv, weight_norm_pairs
from s2conv.errors import S2ConvError
from s2conv.schema import CODEC_GGUF_PREFIX, component_of, layer_of
from s2conv.verify.metrics import TensorError, compare_tensors
from s2conv.verify.thresholds import threshold_for

log = logging.getLogger(__name__)

_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_LAYER_PREFIX = re.compile(r"^(fast_)?layers\.\d+\.")
COMPONENTS = ("slow_ar", "fast_ar", "embeddings", "codec")


@dataclass
class TensorRecord:
    """One GGUF tensor: its storage format, shape, bytes, error vs the source and whether it must be exact."""

    name: str
    format: str
    shape: tuple[int, ...]
    nbytes: int
    component: str
    layer: int | None
    error: TensorError
    must_be_exact: bool  # a float format that holds every source value exactly
    max_rel_rmse: float  # the THRESHOLDS limit for its format

    @property
    def kind(self) -> str:
        """The name without its layer prefix (`attention.wqkv.weight`), or the full name."""
        return _LAYER_PREFIX.sub("", self.name)

    @property
    def failure(self) -> str | None:
        e = self.error
        if self.must_be_exact and not e.exact:
            return f"{self.name}: {self.format} should be lossless, max abs error {e.max_abs:.3g}"
        if not e.rel_rmse <= self.max_rel_rmse:
            return (f"{self.name}: {self.format} relative RMSE {e.rel_rmse:.4g} above the {self.format} limit "
                    f"{self.max_rel_rmse:.4g}")
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"], d["kind"] = list(self.shape), self.kind
        return d


@dataclass
class TensorLevel:
    """All tensor records plus names present on one side only."""

    records: list[TensorRecord] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # source tensors the file lacks
    unexpected: list[str] = field(default_factory=list)  # file tensors without a source

    def failures(self) -> list[str]:
        out = [f for r in self.records if (f := r.failure)]
        out += [f"tensor {n} of the checkpoint is missing in the file" for n in self.missing]
        out += [f"file tensor {n} has no source tensor in the checkpoint" for n in self.unexpected]
        return out

    def summary(self) -> dict:
        """Per component: tensors, params, bytes, bits per weight, pooled relative RMSE (sqrt of summed squared
        error over summed squared reference), worst tensor by relative RMSE, formats used."""
        out = {}
        for comp in COMPONENTS + ("total",):
            recs = [r for r in self.records if comp == "total" or r.component == comp]
            if recs:
                out[comp] = _pool(recs)
        return out

    def per_layer(self) -> dict:
        """{"slow_ar"|"fast_ar": {layer: {kind: rel_rmse}}} for the transformer blocks."""
        out: dict = {}
        for r in self.records:
            if r.layer is not None and r.component in ("slow_ar", "fast_ar"):
                out.setdefault(r.component, {}).setdefault(r.layer, {})[r.kind] = r.error.rel_rmse
        return out

    def to_dict(self) -> dict:
        return dict(summary=self.summary(), per_layer=self.per_layer(), missing=self.missing,
                    unexpected=self.unexpected, tensors=[r.to_dict() for r in self.records])


def _pool(recs: list[TensorRecord]) -> dict:
    err2 = sum((r.error.rel_rmse * r.error.ref_norm) ** 2 for r in recs)
    ref2 = sum(r.error.ref_norm ** 2 for r in recs)
    worst = max(recs, key=lambda r: r.error.rel_rmse)
    params = sum(r.error.numel for r in recs)
    nbytes = sum(r.nbytes for r in recs)
    formats: dict[str, int] = {}
    for r in recs:
        formats[r.format] = formats.get(r.format, 0) + 1
    return dict(tensors=len(recs), params=params, bytes=nbytes, bpw=8 * nbytes / max(params, 1),
                rel_rmse=(err2 / ref2) ** 0.5 if ref2 > 0 else 0.0, min_cosine=min(r.error.cosine for r in recs),
                max_abs=max(r.error.max_abs for r in recs), worst=worst.name, worst_rel_rmse=worst.error.rel_rmse,
                exact=all(r.error.exact for r in recs), formats=formats)


class CheckpointSource:
    """Maps GGUF tensor names to checkpoint tensors. Codec names `c.X` map to codec tensor X or, for a weight-norm
    pair, to g * v / ||v|| folded in fp32 (as the converter does)."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.pairs = weight_norm_pairs(ckpt.codec_names())
        in_pairs = {n for gv in self.pairs.values() for n in gv}
        self.model_names = set(ckpt.model_names())
        self.codec_names = {n for n in ckpt.codec_names() if n not in in_pairs}

    def names(self) -> set[str]:
        """Every GGUF name a complete export holds."""
        return self.model_names | {CODEC_GGUF_PREFIX + n for n in self.codec_names | set(self.pairs)}

    def tensor(self, name: str) -> torch.Tensor | None:
        """The source tensor of GGUF tensor `name`, or None if there is none."""
        if name.startswith(CODEC_GGUF_PREFIX):
            inner = name[len(CODEC_GGUF_PREFIX):]
            if inner in self.pairs:
                g, v = self.pairs[inner]
                return fold_weight_norm(self.ckpt.codec_tensor(g), self.ckpt.codec_tensor(v),
                                        transposed=is_transposed_conv(v))
            return self.ckpt.codec_tensor(inner) if inner in self.codec_names else None
        return self.ckpt.model_tensor(name) if name in self.model_names else None

    def folded_codec(self) -> dict[str, torch.Tensor]:
        """The whole codec state with weight norm folded (fp32 for folded weights), keyed by folded names."""
        return {n[len(CODEC_GGUF_PREFIX):]: self.tensor(n) for n in sorted(self.names())
                if n.startswith(CODEC_GGUF_PREFIX)}


def exactly_representable(src: torch.Tensor, fmt: str) -> bool:
    """True when `fmt` is a float format and every value of src survives the cast (then decoding must be exact)."""
    dtype = _FLOAT_DTYPES.get(fmt)
    if dtype is None:
        return False
    if src.dtype == dtype or (dtype == torch.float32 and src.dtype in (torch.bfloat16, torch.float16)):
        return True
    return bool(torch.equal(src.to(dtype).to(src.dtype), src))


def compare_file_tensors(gguf, ckpt, progress=None) -> TensorLevel:
    """Compare every tensor of the opened GGUFFile `gguf` with the checkpoint `ckpt` (see module docstring).

    progress: optional callable(name) before each tensor."""
    source = CheckpointSource(ckpt)
    level = TensorLevel()
    for name in gguf.tensors:
        if progress is not None:
            progress(name)
        src = source.tensor(name)
        if src is None:
            level.unexpected.append(name)
            continue
        fmt = gguf.tensor_format(name).name
        deq = gguf.dequantize(name, dtype=torch.float32)
        if deq.numel() != src.numel():
            raise S2ConvError(f"{name}: file shape {list(deq.shape)} does not match checkpoint shape "
                              f"{list(src.shape)}")
        level.records.append(TensorRecord(
            name, fmt, tuple(deq.shape), int(gguf.tensor(name).n_bytes), component_of(name), layer_of(name),
            compare_tensors(src, deq), exactly_representable(src, fmt), threshold_for(fmt).max_rel_rmse))
        del src, deq
    level.missing = sorted(source.names() - set(gguf.tensors))
    return level
