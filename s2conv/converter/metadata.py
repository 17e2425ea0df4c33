"""GGUF metadata of an exported file: s2.cpp's `fish-speech.*` / `fish_speech.*` keys, the tokenizer, s2conv's keys.

Every value carries its GGUF type explicitly, because s2.cpp reads keys with strict getters (UINT32 counts and ids,
FLOAT32 floats, BOOL flags; codec arrays INT32) and silently falls back to defaults (or asserts) on a mismatch.
Key names and defaults follow rodrigomatta/s2.cpp's `quantize/unified_export_gguf.py`, `src/s2_model.cpp` and
`src/s2_codec.cpp`; the codec values are the checkpoint's own (s2.cpp's exporter hard-codes S2 Pro's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as T

from s2conv import __version__
from s2conv.errors import ConversionError
from s2conv.schema import (
    ARCH, ARCH_KEY_PREFIX, CODEC_KEY_PREFIX, FISH_KEY_PREFIX, KEY_HF_CONFIG, KEY_LAYOUT_VERSION, KEY_POLICY,
    KEY_SOURCE_HASH, KEY_TENSOR_FORMAT, KEY_TENSOR_SHAPE, KEY_VERSION, CodecConfig, S2Config,
)

GGML_QUANTIZATION_VERSION = 2
LAYOUT_VERSION = 1  # s2conv's I8 block layouts (quant_formats); bump when a private layout changes
# Codec transformer context sizes (fish-speech modded_dac_vq.yaml); not derivable from tensor shapes.
CODEC_TRANSFORMER_BLOCK_SIZE = 8192
CODEC_RVQ_TRANSFORMER_BLOCK_SIZE = 2048
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class KV:
    """One metadata entry. `sub` is the element type of an ARRAY."""

    key: str
    value: Any
    type: T
    sub: T | None = None

    def nbytes(self) -> int:
        """Serialized size in the file: key string, value type, value."""
        return 8 + len(self.key.encode()) + 4 + _value_nbytes(self.value, self.type, self.sub)


_FIXED = {T.UINT8: 1, T.INT8: 1, T.UINT16: 2, T.INT16: 2, T.UINT32: 4, T.INT32: 4, T.FLOAT32: 4, T.BOOL: 1,
          T.UINT64: 8, T.INT64: 8, T.FLOAT64: 8}


def _value_nbytes(v, t: T, sub: T | None) -> int:
    if t in _FIXED:
        return _FIXED[t]
    if t == T.STRING:
        return 8 + len(v.encode("utf-8") if isinstance(v, str) else v)
    if t == T.ARRAY:
        if sub in _FIXED:
            return 12 + _FIXED[sub] * len(v)
        return 12 + sum(_value_nbytes(x, sub, None) for x in v)
    raise ConversionError(f"metadata value type {t!r} is not supported")


def _u32(k, v):
    return KV(k, int(v), T.UINT32)


def _f32(k, v):
    return KV(k, float(v), T.FLOAT32)


def _bool(k, v):
    return KV(k, bool(v), T.BOOL)


def _str(k, v):
    return KV(k, str(v), T.STRING)


def _i32s(k, vs):
    return KV(k, [int(x) for x in vs], T.ARRAY, T.INT32)


def general_kvs(name: str, file_type: int | None) -> list[KV]:
    kvs = [_str("general.architecture", ARCH), _str("general.type", "model"), _str("general.name", name),
           _str("general.basename", "fish-speech-s2-pro"),
           _u32("general.quantization_version", GGML_QUANTIZATION_VERSION)]
    if file_type is not None:
        kvs.append(_u32("general.file_type", file_type))
    return kvs


def model_kvs(cfg: S2Config) -> list[KV]:
    """AR hyper-parameters under both namespaces s2.cpp reads (`fish-speech.` arch keys, `fish_speech.` extras)."""
    a, f = ARCH_KEY_PREFIX, FISH_KEY_PREFIX
    return [
        _u32(a + "context_length", cfg.max_seq_len), _u32(a + "embedding_length", cfg.dim),
        _u32(a + "feed_forward_length", cfg.intermediate_size), _u32(a + "block_count", cfg.n_layer),
        _u32(a + "attention.head_count", cfg.n_head), _u32(a + "attention.head_count_kv", cfg.n_local_heads),
        _u32(a + "attention.key_length", cfg.head_dim), _u32(a + "attention.value_length", cfg.head_dim),
        _f32(a + "rope.freq_base", cfg.rope_base), _f32(a + "attention.layer_norm_rms_epsilon", cfg.norm_eps),
        _u32(a + "vocab_size", cfg.vocab_size),
        _str(f + "model_type", "dual_ar"), _u32(f + "codebook_size", cfg.codebook_size),
        _u32(f + "num_codebooks", cfg.num_codebooks), _u32(f + "semantic_begin_id", cfg.semantic_begin_id),
        _u32(f + "semantic_end_id", cfg.semantic_end_id), _u32(f + "audio_pad_token_id", cfg.audio_pad_token_id),
        _u32(f + "eos_token_id", cfg.eos_token_id), _u32(f + "pad_token_id", cfg.pad_token_id),
        _u32(f + "head_dim", cfg.head_dim),
        # s2.cpp defaults both of these to false: S2 needs them written as true
        _bool(f + "scale_codebook_embeddings", cfg.scale_codebook_embeddings),
        _bool(f + "attention_qk_norm", cfg.attention_qk_norm),
        _bool(f + "norm_fastlayer_input", cfg.norm_fastlayer_input),
        _bool(f + "tie_word_embeddings", cfg.tie_word_embeddings),
        # fast AR: rope base and eps are the text config's (upstream ignores the audio config's)
        _u32(f + "fast_context_length", cfg.num_codebooks + 1), _u32(f + "fast_embedding_length", cfg.fast_dim),
        _u32(f + "fast_feed_forward_length", cfg.fast_intermediate_size),
        _u32(f + "fast_block_count", cfg.n_fast_layer), _u32(f + "fast_head_count", cfg.fast_n_head),
        _u32(f + "fast_head_count_kv", cfg.fast_n_local_heads), _u32(f + "fast_head_dim", cfg.fast_head_dim),
        _f32(f + "fast_rope_freq_base", cfg.rope_base), _f32(f + "fast_layer_norm_rms_eps", cfg.norm_eps),
        _bool(f + "fast_tie_word_embeddings", False), _bool(f + "fast_attention_qk_norm", cfg.fast_attention_qk_norm),
        _bool(f + "fast_attention_qkv_bias", False), _bool(f + "fast_attention_o_bias", False),
        _bool(f + "fast_project_in", cfg.fast_dim != cfg.dim),
    ]


def codec_kvs(cc: CodecConfig) -> list[KV]:
    """Every `fish_speech.codec.*` key s2.cpp requires, with this codec's values.

    frame_length is the encode padding unit hop * prod(downsample) (2048 for S2 Pro, as fish-speech pads);
    s2.cpp's own exporter writes 512 there. No decoder transformer has weights, so its layer counts are 0.
    """
    c = CODEC_KEY_PREFIX
    return [
        _u32(c + "sample_rate", cc.sample_rate), _u32(c + "hop_length", cc.hop_length),
        _u32(c + "frame_length", cc.frame_length), _u32(c + "encoder_dim", cc.encoder_dim),
        _u32(c + "decoder_dim", cc.decoder_dim), _u32(c + "latent_dim", cc.latent_dim),
        _i32s(c + "encoder_rates", cc.encoder_rates), _i32s(c + "decoder_rates", cc.decoder_rates),
        _i32s(c + "encoder_transformer_layers", cc.encoder_transformer_layers),
        _i32s(c + "decoder_transformer_layers", (0,) * len(cc.decoder_rates)),
        _str(c + "quantizer_type", "downsample_residual_vector_quantize"),
        _u32(c + "quantizer_input_dim", cc.latent_dim), _u32(c + "quantizer_codebook_dim", cc.codebook_dim),
        _u32(c + "quantizer_residual_codebooks", cc.n_residual_codebooks),
        _u32(c + "quantizer_residual_codebook_size", cc.residual_codebook_size),
        _u32(c + "quantizer_semantic_codebook_size", cc.semantic_codebook_size),
        _i32s(c + "quantizer_downsample_factor", cc.downsample_factor),
        _u32(c + "transformer.block_size", CODEC_TRANSFORMER_BLOCK_SIZE),
        _u32(c + "transformer.window_size", cc.encoder_transformer_window),
        KV(c + "transformer.n_local_heads", -1, T.INT32),  # -1: as many KV heads as query heads
        _u32(c + "transformer.head_dim", cc.head_dim), _f32(c + "transformer.rope_freq_base", cc.rope_base),
        _f32(c + "transformer.layer_norm_rms_eps", cc.norm_eps),
        _u32(c + "rvq_transformer.window_size", cc.rvq_window),
        _u32(c + "rvq_transformer.block_size", CODEC_RVQ_TRANSFORMER_BLOCK_SIZE),
        _u32(c + "rvq_transformer.n_layer", cc.rvq_n_layer), _u32(c + "rvq_transformer.n_head", cc.n_head),
        KV(c + "rvq_transformer.n_local_heads", -1, T.INT32),
        _u32(c + "rvq_transformer.head_dim", cc.head_dim), _u32(c + "rvq_transformer.dim", cc.latent_dim),
        _u32(c + "rvq_transformer.feed_forward_length", cc.intermediate_size),
        _f32(c + "rvq_transformer.rope_freq_base", cc.rope_base),
        _f32(c + "rvq_transformer.layer_norm_rms_eps", cc.norm_eps),
    ]


def tokenizer_kvs(tokenizer_json: Path, cfg: S2Config) -> list[KV]:
    """llama.cpp's gpt2-style tokenizer keys from a HF tokenizer.json (byte-level BPE, Qwen2 pre-tokenizer).

    The token list spans the whole embedding (vocab_size rows): ids no token uses become `[PAD<id>]` of type
    unused, as convert_hf_to_gguf.py pads. Added tokens are control (special) or user-defined. The json itself is
    kept under tokenizer.huggingface.json so `unpack` can restore it byte for byte.
    """
    text = tokenizer_json.read_text(encoding="utf-8")
    try:
        tj = json.loads(text)
        model = tj["model"]
        vocab: dict[str, int] = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        added = tj.get("added_tokens", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{tokenizer_json}: not a BPE tokenizer.json ({e})") from None
    n = max([cfg.vocab_size, *(i + 1 for i in vocab.values()), *(t["id"] + 1 for t in added)])
    tokens: list[str | None] = [None] * n
    types = [TOKEN_UNUSED] * n
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, TOKEN_NORMAL
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = TOKEN_CONTROL if t.get("special", False) else TOKEN_USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    ids = {t: i for i, t in enumerate(tokens)}
    k = "tokenizer.ggml."
    kvs = [_str(k + "model", "gpt2"), _str(k + "pre", "qwen2"), KV(k + "tokens", tokens, T.ARRAY, T.STRING),
           KV(k + "token_type", types, T.ARRAY, T.INT32)]
    if merges:
        kvs.append(KV(k + "merges", merges, T.ARRAY, T.STRING))
    kvs += [_u32(k + "eos_token_id", ids.get("<|im_end|>", cfg.eos_token_id)),
            _u32(k + "padding_token_id", ids.get("<|pad|>", cfg.pad_token_id))]
    if "<|endoftext|>" in ids:
        kvs.append(_u32(k + "bos_token_id", ids["<|endoftext|>"]))
    kvs += [_bool(k + "add_bos_token", False), _str("tokenizer.huggingface.json", text)]
    return kvs


def s2conv_kvs(policy_json: str, source_hash: str, hf_config_text: str, rows) -> list[KV]:
    """s2conv's own keys: versions, provenance, policy, config.json, and the decoder key of each I8 tensor."""
    kvs = [_str(KEY_VERSION, __version__), _u32(KEY_LAYOUT_VERSION, LAYOUT_VERSION),
           _str(KEY_SOURCE_HASH, source_hash), _str(KEY_POLICY, policy_json),
           _str(KEY_HF_CONFIG, hf_config_text)]
    for r in rows:
        if r.is_private:
            kvs.append(_str(KEY_TENSOR_FORMAT.format(name=r.name), r.stored))
            kvs.append(KV(KEY_TENSOR_SHAPE.format(name=r.name), list(r.shape), T.ARRAY, T.UINT64))
    return kvs


def check_kvs(kvs: list[KV]) -> None:
    """Unique keys, no nested arrays (the ggml C loader rejects them), no empty arrays or strings gguf-py drops."""
    seen = set()
    for kv in kvs:
        if kv.key in seen:
            raise ConversionError(f"metadata key {kv.key!r} written twice")
        seen.add(kv.key)
        if kv.type == T.ARRAY and (kv.sub in (None, T.ARRAY) or len(kv.value) == 0):
            raise ConversionError(f"metadata key {kv.key!r}: arrays must be flat and non-empty")
