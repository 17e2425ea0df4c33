"""The export plan: one row per GGUF tensor (name, sources, shape, storage format, bytes), before any data moves.

`build_plan` turns tensor descriptions plus a `Policy` into `PlanRow`s. The writer writes exactly these rows (in this
order, with these types and byte counts), `--dry-run` prints them, and `s2conv sizes` builds them from the
published shapes alone; so a dry run and a written file cannot disagree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gguf import GGMLQuantizationType

from s2conv.codec_schema import fold_weight_norm_name, is_weight_norm_g, is_weight_norm_v, weight_norm_pairs
from s2conv.converter.policy import Policy, source_type_name
from s2conv.errors import ConversionError
from s2conv.quant_formats import get_format
from s2conv.schema import CODEC_GGUF_PREFIX, component_of

GGML_MAX_NAME = 63  # bytes, without the NUL ggml adds (GGML_MAX_NAME = 64)
GGML_MAX_DIMS = 4
COMPONENTS = ("slow_ar", "fast_ar", "embeddings", "codec")


@dataclass(frozen=True)
class SourceTensor:
    """One tensor to export, as the checkpoint has it.

    kind: "model" (sources = (model name,)), "codec" (sources = (codec name,)) or "codec_wn" (a weight-norm pair,
    sources = (g name, v name), folded at export).
    """

    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # PyTorch shape (after folding)
    dtype: str  # source precision: bf16 / f16 / f32
    kind: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class PlanRow:
    """One GGUF tensor. `stored_shape` is the numpy-order shape of the stored elements: the logical shape for
    ggml-native types, (rows, row_bytes) for s2conv's I8-stored formats. `nbytes` excludes alignment padding."""

    name: str
    component: str
    kind: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    source_dtype: str
    format: str  # the quantizer's format (registry name)
    stored: str  # the format whose bytes are in the file (== format unless --compat)
    ggml_type: str  # GGMLQuantizationType name of the stored tensor
    stored_shape: tuple[int, ...]
    nbytes: int
    rule: str

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def is_private(self) -> bool:
        """Stored as I8 bytes decoded through s2conv.format.<name> metadata."""
        return not get_format(self.stored).is_native

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_params"] = self.n_params
        return d


def model_sources(names, shape_of, dtype_of) -> list[SourceTensor]:
    """Model tensors (model names, e.g. `layers.0.attention.wqkv.weight`) in the given order."""
    return [SourceTensor(n, tuple(shape_of(n)), source_type_name(dtype_of(n)), "model", (n,)) for n in names]


def codec_sources(names, shape_of, dtype_of) -> list[SourceTensor]:
    """Codec tensors (release names) -> `c.`-prefixed GGUF tensors with every weight-norm pair folded into one.

    The folded tensor takes the place of the pair's v tensor in the release order; g tensors disappear.
    """
    names = list(names)
    pairs = weight_norm_pairs(names)
    paired = {n for gv in pairs.values() for n in gv}
    out = []
    for n in names:
        if is_weight_norm_g(n) and n in paired:
            continue
        if is_weight_norm_v(n) and n in paired:
            folded = fold_weight_norm_name(n)
            g, v = pairs[folded]
            out.append(SourceTensor(CODEC_GGUF_PREFIX + folded, tuple(shape_of(v)),
                                   source_type_name(dtype_of(v)), "codec_wn", (g, v)))
            continue
        if is_weight_norm_g(n) or is_weight_norm_v(n):
            raise ConversionError(f"codec tensor {n!r}: weight-norm half without its partner")
        out.append(SourceTensor(CODEC_GGUF_PREFIX + n, tuple(shape_of(n)), source_type_name(dtype_of(n)), "codec", (n,)))
    return out


def plan_row(src: SourceTensor, policy: Policy) -> PlanRow:
    """Choose the storage of one tensor and compute its stored shape and size."""
    choice = policy.choose(src.name, src.shape, src.dtype)
    if getattr(get_format(choice.format), "can_quantize", True) is False:
        raise ConversionError(f"tensor {src.name!r}: format {choice.format!r} can only be decoded, not written")
    stored = get_format(choice.stored)
    shape = src.shape if src.shape else (1,)
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1]
    row_bytes = stored.row_bytes(cols)
    if stored.is_native:
        stored_shape = tuple(shape)
    else:
        stored_shape = (rows, row_bytes)
    return PlanRow(
        name=src.name, component=component_of(src.name), kind=src.kind, sources=src.sources, shape=tuple(shape),
        source_dtype=src.dtype, format=choice.format, stored=choice.stored,
        ggml_type=GGMLQuantizationType(stored.ggml_type).name, stored_shape=stored_shape, nbytes=rows * row_bytes,
        rule=choice.rule,
    )


def build_plan(sources: list[SourceTensor], policy: Policy) -> list[PlanRow]:
    """Plan every tensor and check the ggml C loader's rules (gguf-py's writer does not)."""
    rows = [plan_row(s, policy) for s in sources]
    check_ggml_rules(rows)
    return rows


def check_ggml_rules(rows: list[PlanRow]) -> None:
    """Names <= 63 bytes and unique, <= 4 dims, row length a multiple of the stored type's block size."""
    seen = set()
    for r in rows:
        if len(r.name.encode("utf-8")) > GGML_MAX_NAME:
            raise ConversionError(f"tensor name {r.name!r} is {len(r.name.encode())} bytes; ggml allows {GGML_MAX_NAME}")
        if r.name in seen:
            raise ConversionError(f"tensor name {r.name!r} appears twice")
        seen.add(r.name)
        if len(r.stored_shape) > GGML_MAX_DIMS:
            raise ConversionError(f"tensor {r.name!r} has {len(r.stored_shape)} dims; ggml allows {GGML_MAX_DIMS}")
        block = get_format(r.stored).block_size if get_format(r.stored).is_native else 1
        if r.stored_shape[-1] % block:
            raise ConversionError(
                f"tensor {r.name!r}: row length {r.stored_shape[-1]} is not a multiple of block {block} of {r.stored}"
            )


def summarize(rows: list[PlanRow]) -> dict:
    """Per component and total: tensors, parameters, bytes, bits per weight, size relative to bf16."""
    out = {}
    for comp in COMPONENTS + ("total",):
        sel = [r for r in rows if comp == "total" or r.component == comp]
        if not sel:
            continue
        params = sum(r.n_params for r in sel)
        nbytes = sum(r.nbytes for r in sel)
        out[comp] = dict(
            tensors=len(sel), params=params, bytes=nbytes, bpw=8.0 * nbytes / params if params else 0.0,
            bf16_bytes=2 * params, vs_bf16=nbytes / (2 * params) if params else 0.0,
        )
    return out


def format_plan(rows: list[PlanRow]) -> str:
    """The dry-run table: every tensor with its chosen type and bytes."""
    w = max((len(r.name) for r in rows), default=4)
    lines = [f"{'tensor':<{w}}  {'shape':<20} {'src':<5} {'format':<7} {'stored':<7} {'bytes':>12}  rule"]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{w}}  {shape:<20} {r.source_dtype:<5} {r.format:<7} {r.stored:<7} {r.nbytes:>12}  {r.rule}")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """Sizes per component: tensors, parameters, MiB, bits per weight, size vs bf16."""
    lines = [f"{'component':<11} {'tensors':>7} {'params':>14} {'MiB':>11} {'bpw':>7} {'vs bf16':>8}"]
    for comp, s in summary.items():
        lines.append(
            f"{comp:<11} {s['tensors']:>7} {s['params']:>14,} {s['bytes'] / 2**20:>11.2f} {s['bpw']:>7.3f} "
            f"{100 * s['vs_bf16']:>7.1f}%"
        )
    return "\n".join(lines)
