"""The export precision policy: which storage format every tensor gets. The only place precision policy lives.

`Policy` holds the user's choices (`--type`, `--target`, `--tensor-type`, `--keep-type`, `--codec-type`,
`--compat`); `Policy.choose(name, shape, source)` turns them into one storage format per tensor. The llama-quantize
"_m"/"_s" mixes, the phase shorthands and the block-size fallbacks are tables below, so changing the policy means
editing data, not code.

Decisions (documented in `docs/export.md` terms):
- `--target slow` quantizes the slow AR's Linear weights (wqkv, wo, w1, w2, w3); `--target all` also the fast AR's.
  Embeddings (`embeddings.weight` is also the tied output head), `codebook_embeddings`, `fast_embeddings` and
  `fast_output` keep source precision unless a `--tensor-type` rule names them (s2.cpp issue #13: K-quant
  embeddings crash CUDA get_rows; quantizing the head hurts `<|im_end|>`). A mix named by such a rule applies
  llama-quantize's output rule to the two heads (Q6_K, Q8_0 when a row is not a multiple of 256) and the mix's
  base type to the two embedding tables.
- Mixes count layers per transformer: `use_more_bits(i, n)` runs over the 36 slow layers and, separately, over
  the fast layers. wqkv follows llama's attn_v rules ("v-like"), w2 = ffn_down, wo = attn_output.
- Norms and other 1-D tensors are never quantized: AR norms F32 (s2.cpp takes F16 or F32), codec 1-D tensors the
  codec type. A `--tensor-type` rule may move them between float types only.
- The codec is `--codec-type` (default f16) everywhere. s2.cpp needs F16 non-transposed conv kernels and F16/F32
  VQ tensors: `--codec-type f32` or `bf16` gives files s2.cpp cannot load (s2conv's runtime can).
- A row length that the chosen format's block does not divide falls back along `FALLBACK` (llama-quantize's
  rules for ggml types; per-row q8 for S2's group formats), ending at source precision.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from s2conv.errors import ConversionError, QuantFormatError
from s2conv.quant_formats import get_format
from s2conv.schema import CODEC_GGUF_PREFIX, is_linear_weight, layer_of

# ---------------------------------------------------------------------------------------------------------------
# Type names
# ---------------------------------------------------------------------------------------------------------------

KEEP = "keep"  # source precision (bf16 for the release's matrices)
FLOAT_TYPES = ("f32", "f16", "bf16")
S2_TYPES = ("fp8", "q8", "q4", "q3", "q2")
GGML_PURE_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q4_0")

# llama-quantize mixes: name -> base ggml type of every quantized tensor (the per-kind bumps are in `_mix_rule`).
MIXES = {
    "q5_k_m": "q5_k", "q5_k_s": "q5_k", "q4_k_m": "q4_k", "q4_k_s": "q4_k",
    "q3_k_m": "q3_k", "q3_k_s": "q3_k", "q2_k": "q2_k",
}
TYPE_CHOICES = S2_TYPES + GGML_PURE_TYPES + tuple(MIXES)
TARGETS = ("slow", "all")
CODEC_TYPES = FLOAT_TYPES

# --phase shorthands of the project plan: phase -> (type, target)
PHASES = {
    "1a": ("fp8", "slow"), "1b": ("q4", "slow"), "2a": ("q4", "all"), "2b": ("q8", "slow"),
    "2c": ("q3", "slow"), "3a": ("q2", "slow"), "3b": ("q2", "all"),
}

# When a row length is not a multiple of the format's block: try the next format (llama-quant.cpp's fallbacks for
# ggml types; S2's group formats fall back to per-row q8). The chain ends at source precision.
FALLBACK = {
    "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0", "tq2_0": "q4_0",
    "q4": "q8", "q3": "q8", "q2": "q8",
}

# llama.cpp file types (general.file_type) of the --type names
FILE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "bf16": 32,
}

# s2conv's group formats stored as exact ggml types under --compat
COMPAT_TYPES = {"q4": "q4_0", "q3": "q4_0", "q8": "q8_0"}

_LINEAR_KIND = {"attention.wqkv": "attn_v", "attention.wo": "attn_output", "feed_forward.w2": "ffn_down"}
_HEADS = ("embeddings.weight", "fast_output.weight")  # llama's "output.weight" rule (embeddings is the tied head)
_TABLES = ("codebook_embeddings.weight", "fast_embeddings.weight")


def source_type_name(dtype) -> str:
    """'bf16' / 'f16' / 'f32' for a torch dtype (or its string); other dtypes are not float weights."""
    s = str(dtype).replace("torch.", "")
    names = {"bfloat16": "bf16", "float16": "f16", "half": "f16", "float32": "f32", "float": "f32"}
    if s in names:
        return names[s]
    if s in FLOAT_TYPES:
        return s
    raise ConversionError(f"tensor dtype {s} is not a float type (expected bfloat16, float16 or float32)")


def use_more_bits(i: int, n: int) -> bool:
    """llama-quantize: the first and last eighth of the layers and every third layer between get more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_rule(mix: str, kind: str, i: int, n: int, n_gqa: int) -> str:
    """llama-quant.cpp's llama_tensor_get_type for one Linear of layer i of n (no experts, not Falcon)."""
    base = MIXES[mix]
    if kind == "attn_v":  # wqkv counts as v-like, and the v test comes first in llama-quant.cpp
        if mix == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if mix == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if mix == "q4_k_s" and i < 4:
            return "q5_k"
    elif kind == "ffn_down":
        if mix == "q2_k":
            return "q3_k"
        if mix == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if mix == "q4_k_s" and i < n // 8:
            return "q5_k"
    elif kind == "attn_output":
        if mix == "q2_k":
            return "q3_k"
        if mix == "q3_k_m":
            return "q4_k"
    return base


@dataclass(frozen=True)
class ModelDims:
    """What the mixes need to know about the model: layer counts and the GQA ratio."""

    n_layer: int = 36
    n_fast_layer: int = 4
    n_gqa: int = 4
    fast_n_gqa: int = 4

    @classmethod
    def from_config(cls, cfg) -> "ModelDims":
        return cls(cfg.n_layer, cfg.n_fast_layer, cfg.n_head // cfg.n_local_heads,
                   cfg.fast_n_head // cfg.fast_n_local_heads)


@dataclass(frozen=True)
class Choice:
    """The storage decision for one tensor: `format` is a quant_formats registry name; `stored` the name of the
    format whose bytes land in the file (differs from `format` only under --compat); `rule` says why."""

    format: str
    stored: str
    rule: str


@dataclass(frozen=True)
class Policy:
    """User-facing export options. `type` applies to the Linear weights of `target`; see the module docstring."""

    type: str = "bf16"
    target: str = "slow"
    tensor_types: tuple[tuple[str, str], ...] = ()  # (regex, type), first match wins
    keep_types: tuple[str, ...] = ()  # regexes kept at source precision
    codec_type: str = "f16"
    norm_type: str = "f32"
    compat: bool = False
    dims: ModelDims = field(default_factory=ModelDims)

    def __post_init__(self):
        if self.type not in TYPE_CHOICES:
            raise ConversionError(f"unknown --type {self.type!r}; known: {', '.join(TYPE_CHOICES)}")
        if self.target not in TARGETS:
            raise ConversionError(f"unknown --target {self.target!r}; expected slow or all")
        if self.codec_type not in CODEC_TYPES:
            raise ConversionError(f"unknown --codec-type {self.codec_type!r}; expected f16, f32 or bf16")
        if self.norm_type not in ("f32", "f16"):
            raise ConversionError(f"norm type {self.norm_type!r} is not f32 or f16")
        for rx, t in self.tensor_types:
            _compile(rx, "--tensor-type")
            _check_type_name(t)
        for rx in self.keep_types:
            _compile(rx, "--keep-type")

    # ----- construction from CLI values --------------------------------------------------------------------------
    @classmethod
    def from_options(cls, type: str | None = None, target: str | None = None, phase: str | None = None,
                     tensor_type=(), keep_type=(), codec_type: str = "f16", compat: bool = False,
                     dims: ModelDims | None = None) -> "Policy":
        """`--phase` gives type and target; an explicit --type/--target must agree with it.
        `tensor_type` items are "REGEX=TYPE" strings."""
        if phase is not None:
            if phase not in PHASES:
                raise ConversionError(f"unknown --phase {phase!r}; known: {', '.join(PHASES)}")
            p_type, p_target = PHASES[phase]
            for given, implied, opt in ((type, p_type, "--type"), (target, p_target, "--target")):
                if given is not None and given != implied:
                    raise ConversionError(f"--phase {phase} means {opt} {implied}, but {opt} {given} was given")
            type, target = p_type, p_target
        rules = []
        for item in tensor_type:
            rx, sep, t = item.rpartition("=")
            if not sep or not rx:
                raise ConversionError(f"--tensor-type {item!r}: expected REGEX=TYPE")
            rules.append((rx, t.strip().lower()))
        return cls(type=(type or "bf16").lower(), target=target or "slow", tensor_types=tuple(rules),
                   keep_types=tuple(keep_type), codec_type=codec_type.lower(), compat=compat,
                   dims=dims or ModelDims())

    def to_json(self) -> str:
        """Stored in the GGUF under s2conv.policy (stable key order)."""
        d = dict(type=self.type, target=self.target, tensor_types=[list(r) for r in self.tensor_types],
                 keep_types=list(self.keep_types), codec_type=self.codec_type, norm_type=self.norm_type,
                 compat=self.compat)
        return json.dumps(d, sort_keys=True)

    @property
    def file_type(self) -> int | None:
        """general.file_type for llama.cpp-style type names; None for s2conv's own formats."""
        return FILE_TYPES.get(self.type)

    # ----- the decision ------------------------------------------------------------------------------------------
    def choose(self, name: str, shape: tuple[int, ...], source: str) -> Choice:
        """Storage format of GGUF tensor `name` (PyTorch `shape`, source precision `source` like 'bf16')."""
        fmt, rule = self._wanted(name, shape, source)
        fmt, rule = _fit_block(fmt, rule, shape, source)
        stored = COMPAT_TYPES.get(fmt, fmt) if self.compat else fmt
        return Choice(fmt, stored, rule)

    def _wanted(self, name: str, shape: tuple[int, ...], source: str) -> tuple[str, str]:
        is_codec = name.startswith(CODEC_GGUF_PREFIX)
        floaty = len(shape) < 2 or name.endswith("norm.weight") or is_codec
        if is_codec:
            default, why = self.codec_type, "codec"
        elif floaty:
            default, why = self.norm_type, "norm/1-D"
        else:
            default, why = source, "source precision"
        if not floaty:
            for rx in self.keep_types:
                if re.search(rx, name):
                    return source, f"--keep-type {rx}"
        for rx, t in self.tensor_types:
            if re.search(rx, name):
                if floaty and t not in FLOAT_TYPES:
                    continue  # norms, 1-D and codec tensors are never quantized
                return self._resolve(t, name, source), f"--tensor-type {rx}={t}"
        if not floaty and _is_target_linear(name, self.target):
            return self._resolve(self.type, name, source), f"--type {self.type} (--target {self.target})"
        return default, why

    def _resolve(self, t: str, name: str, source: str) -> str:
        """A type name (plain format, 'keep' or a mix) -> a format name for this tensor."""
        if t == KEEP:
            return source
        if t not in MIXES:
            return t
        if name in _HEADS:
            return "q6_k"  # llama's output-tensor rule for every K mix (Q8_0 fallback in _fit_block)
        if name in _TABLES:
            return MIXES[t]
        kind = next((k for lin, k in _LINEAR_KIND.items() if f".{lin}.weight" in name), "other")
        i = layer_of(name) or 0
        fast = name.startswith("fast_")
        n = self.dims.n_fast_layer if fast else self.dims.n_layer
        return _mix_rule(t, kind, i, n, self.dims.fast_n_gqa if fast else self.dims.n_gqa)


def _is_target_linear(name: str, target: str) -> bool:
    if not is_linear_weight(name):
        return False
    return target == "all" or not name.startswith("fast_")


def _fit_block(fmt: str, rule: str, shape: tuple[int, ...], source: str) -> tuple[str, str]:
    """Follow FALLBACK until the format's block divides the row length (the last PyTorch dim)."""
    cols = shape[-1] if shape else 1
    start = fmt
    while True:
        block = get_format(fmt).block_size
        if cols % block == 0:
            return fmt, rule if fmt == start else f"{rule}; {start} -> {fmt}: row {cols} % block"
        nxt = FALLBACK.get(fmt)
        if nxt is None or nxt == fmt:
            nxt = source if fmt != source else "f32"
        fmt = nxt


def _compile(rx: str, opt: str):
    try:
        return re.compile(rx)
    except re.error as e:
        raise ConversionError(f"{opt} {rx!r}: bad regular expression: {e}") from None


def _check_type_name(t: str) -> None:
    if t == KEEP or t in MIXES:
        return
    try:
        get_format(t)
    except QuantFormatError:
        raise ConversionError(
            f"unknown tensor type {t!r}; expected keep, a --type name ({', '.join(TYPE_CHOICES)}) or a format"
        ) from None
