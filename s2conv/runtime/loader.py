"""Load an S2 Pro GGUF (s2conv's or any file in s2.cpp's conventions) into the runtime's modules.

The dual-AR model is built on the meta device from the file's metadata; every Linear whose tensor is stored in a
lossy format becomes a `QuantLinear` holding the packed bytes on the target device, everything else (embeddings,
norms, float matrices) is decoded to the model dtype. The codec comes from the `c.*` tensors (weight norm folded).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s2conv.codec_schema import codec_config_from_shapes
from s2conv.errors import CheckpointError, RuntimeModelError, S2ConvError, SchemaError
from s2conv.gguf_io import GGUFFile
from s2conv.runtime.codec import Codec
from s2conv.runtime import fused_decode
from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.qlinear import QuantLinear
from s2conv.runtime.tokenizer import build_tokenizer
from s2conv.schema import ARCH, ARCH_KEY_PREFIX as A, CODEC_GGUF_PREFIX, CODEC_KEY_PREFIX, FISH_KEY_PREFIX as F, \
    S2Config

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything the pipeline needs from one GGUF file."""

    path: Path
    config: S2Config
    model: DualARTransformer
    codec: Codec
    tokenizer: object  # tokenizers.Tokenizer
    formats: dict[str, int]  # storage format -> tensor count (for reports)


def s2_config_from_gguf(f: GGUFFile) -> S2Config:
    """S2Config from `fish-speech.*` / `fish_speech.*` keys (s2.cpp's names), defaults being S2 Pro's values.

    The slow head_dim comes from `q_norm.weight` when QK-norm is on (as s2.cpp does), else from the wqkv shape.
    <|im_end|> is resolved by name in the file's vocabulary."""
    d = S2Config()
    u = lambda key, default: f.get(key, default, kind=int)  # noqa: E731
    # FLOAT32 metadata: take the shortest decimal that rounds to the stored value (1e-06, not 9.99999997e-07)
    fl = lambda key, default: float(f"{f.get(key, default, kind=float):.7g}")  # noqa: E731
    b = lambda key, default: f.get(key, default, kind=bool)  # noqa: E731
    n_head, dim = u(A + "attention.head_count", d.n_head), u(A + "embedding_length", d.dim)
    n_kv = u(A + "attention.head_count_kv", d.n_local_heads)
    qk_norm = b(F + "attention_qk_norm", False)
    if qk_norm and "layers.0.attention.q_norm.weight" in f.tensors:
        head_dim = f.tensor_shape("layers.0.attention.q_norm.weight")[0]
    elif "layers.0.attention.wqkv.weight" in f.tensors:
        head_dim = f.tensor_shape("layers.0.attention.wqkv.weight")[0] // (n_head + 2 * n_kv)
    else:
        head_dim = u(A + "attention.key_length", dim // n_head)
    ids = {t: i for i, t in enumerate(f.get("tokenizer.ggml.tokens", []))}
    return S2Config(
        vocab_size=u(A + "vocab_size", d.vocab_size), n_layer=u(A + "block_count", d.n_layer), dim=dim,
        n_head=n_head, n_local_heads=n_kv, head_dim=head_dim,
        intermediate_size=u(A + "feed_forward_length", d.intermediate_size),
        rope_base=fl(A + "rope.freq_base", d.rope_base),
        norm_eps=fl(A + "attention.layer_norm_rms_epsilon", d.norm_eps),
        max_seq_len=u(A + "context_length", d.max_seq_len), attention_qk_norm=qk_norm,
        tie_word_embeddings=b(F + "tie_word_embeddings", True),
        n_fast_layer=u(F + "fast_block_count", d.n_fast_layer), fast_dim=u(F + "fast_embedding_length", d.fast_dim),
        fast_n_head=u(F + "fast_head_count", d.fast_n_head),
        fast_n_local_heads=u(F + "fast_head_count_kv", d.fast_n_local_heads),
        fast_head_dim=u(F + "fast_head_dim", d.fast_head_dim),
        fast_intermediate_size=u(F + "fast_feed_forward_length", d.fast_intermediate_size),
        fast_attention_qk_norm=b(F + "fast_attention_qk_norm", False),
        codebook_size=u(F + "codebook_size", d.codebook_size), num_codebooks=u(F + "num_codebooks", d.num_codebooks),
        semantic_begin_id=u(F + "semantic_begin_id", d.semantic_begin_id),
        semantic_end_id=u(F + "semantic_end_id", d.semantic_end_id),
        eos_token_id=ids.get("<|im_end|>", d.eos_token_id), pad_token_id=ids.get("<|pad|>", d.pad_token_id),
        audio_pad_token_id=ids.get("<|audio_pad|>", d.audio_pad_token_id),
        scale_codebook_embeddings=b(F + "scale_codebook_embeddings", False),
    )


def load_tokenizer(f: GGUFFile):
    """The tokenizer from `tokenizer.ggml.*` metadata."""
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type", [1] * len(tokens))
    return build_tokenizer(tokens, types, f.get("tokenizer.ggml.merges", []))


def _build_dual_ar(f: GGUFFile, cfg: S2Config, dtype, device, formats: dict) -> DualARTransformer:
    with torch.device("meta"):
        model = DualARTransformer(cfg)
    weights = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name + ".weight" not in f.tensors:
            continue
        fmt = f.tensor_format(name + ".weight")
        if fmt.lossless or fmt.name in ("f16", "bf16"):
            continue  # float storage: decoded below like any other tensor
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear(fmt, module.in_features, module.out_features, device="meta"))
        rows, cols = f.tensor_rows(name + ".weight")
        if cols != module.in_features or rows.shape[0] != module.out_features:
            raise SchemaError(f"{name}.weight: shape [{rows.shape[0]}, {cols}], model expects "
                              f"[{module.out_features}, {module.in_features}]")
        weights[name + ".weight"] = torch.from_numpy(np.array(rows)).to(device)
    for name in model.state_dict():
        if name in weights:
            continue
        weights[name] = f.dequantize(name, dtype=dtype, device=device)
    for name in weights:
        fmt = f.tensor_format(name).name
        formats[fmt] = formats.get(fmt, 0) + 1
    try:
        model.load_weights(weights)
    except (RuntimeError, ValueError) as e:  # shape mismatch between metadata and tensors
        raise SchemaError(f"{f.path.name}: tensors do not fit the model described by its metadata: "
                          f"{str(e).splitlines()[0]}") from None
    weights.clear()  # the model holds the tensors now: each prepare_kernel below frees its storage bytes at once
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare_kernel()  # CUDA: repack into the kernel layout, which replaces the storage bytes
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # hand the freed storage bytes back to the driver (nvidia-smi shows the real size)
    fused_decode.enable(model)  # CUDA models only: batch-1 decode steps through the fused Triton kernels
    return model


def _build_codec(f: GGUFFile, dtype, device, formats: dict) -> Codec:
    names = [n for n in f.tensors if n.startswith(CODEC_GGUF_PREFIX)]
    if not names:
        raise SchemaError(f"{f.path.name}: no codec tensors (c.*) in the file")
    shapes = {n[len(CODEC_GGUF_PREFIX):]: f.tensor_shape(n) for n in names}
    try:
        cc = codec_config_from_shapes(shapes)
    except CheckpointError as e:  # the same shape rules as for codec.pth; here the GGUF is at fault
        raise SchemaError(f"{f.path.name}: {e}") from None
    window = f.get(CODEC_KEY_PREFIX + "rvq_transformer.window_size", None)
    if window is not None:
        cc = cc.replace(rvq_window=int(window))
    weights = {}
    for n in names:
        weights[n[len(CODEC_GGUF_PREFIX):]] = f.dequantize(n, dtype=torch.float32)
        fmt = f.tensor_format(n).name
        formats["codec:" + fmt] = formats.get("codec:" + fmt, 0) + 1
    try:
        return Codec.from_weights(cc, weights, dtype=dtype, device=device)
    except (RuntimeError, ValueError) as e:  # tensor shapes that do not fit together (found by scripts/fuzz.py)
        raise SchemaError(f"{f.path.name}: codec tensors do not fit together: {str(e).splitlines()[-1].strip()}") \
            from None


def _check_layer_counts(f: GGUFFile, cfg: S2Config) -> None:
    """Layer counts from metadata must match the file's tensors before any module is built: a forged block_count
    of 2**31 would otherwise create modules for minutes (hyper-parameters are not bounded by the file size)."""
    for prefix, n, key in (("layers", cfg.n_layer, A + "block_count"), ("fast_layers", cfg.n_fast_layer,
                                                                          F + "fast_block_count")):
        if n < 1 or f"{prefix}.{n - 1}.attention_norm.weight" not in f.tensors \
                or f"{prefix}.{n}.attention_norm.weight" in f.tensors:
            raise SchemaError(f"{f.path.name}: {key} is {n}, which does not match the {prefix}.N tensors in the file")
    for name in ("norm_eps", "rope_base"):  # a NaN or non-positive value would load and compute NaN everywhere
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise SchemaError(f"{f.path.name}: {name} is {value}, expected a finite positive number")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               codec_dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a GGUF file: dual-AR model (default bf16), codec (default fp32 on CPU, bf16 on CUDA), tokenizer."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeModelError("--device cuda requested but CUDA is not available")
    dtype = dtype or torch.bfloat16
    codec_dtype = codec_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    f = GGUFFile(path)
    arch = f.get("general.architecture", None)
    if arch != ARCH:
        raise SchemaError(f"{f.path.name}: general.architecture is {arch!r}, not {ARCH!r}: not an S2 Pro model")
    try:
        cfg = s2_config_from_gguf(f)
        _check_layer_counts(f, cfg)
        formats: dict[str, int] = {}
        model = _build_dual_ar(f, cfg, dtype, device, formats)
        codec = _build_codec(f, codec_dtype, device, formats)
        tokenizer = load_tokenizer(f)
    except S2ConvError:
        raise
    except (ValueError, KeyError, IndexError, TypeError) as e:  # malformed values deep in the file
        raise SchemaError(f"{f.path.name}: cannot build the model: {type(e).__name__}: {e}") from None
    log.info("loaded %s: %s", f.path.name, formats)
    return LoadedModel(f.path, cfg, model, codec, tokenizer, formats)
