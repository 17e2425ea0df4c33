"""The contract strings and shapes of S2 Pro: model config, tensor names, GGUF metadata keys.

Everything here is data or pure functions on data; no torch, no file I/O. The checkpoint reader, the converter, the
runtime loader and the verifier all take names and keys from this module, so a name is spelled in one place.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from s2conv.errors import CheckpointError

# ---------------------------------------------------------------------------------------------------------------
# Model configuration (config.json of the release, flattened the way fish-speech's DualARModelArgs is).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S2Config:
    """Hyper-parameters of the dual-AR transformer. Defaults are S2 Pro's released values."""

    # slow AR (text_config)
    vocab_size: int = 155776
    n_layer: int = 36
    dim: int = 2560
    n_head: int = 32
    n_local_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 32768
    attention_qk_norm: bool = True
    tie_word_embeddings: bool = True
    # fast AR (audio_decoder_config); rope_base and norm_eps are the slow AR's (upstream ignores the audio config's)
    n_fast_layer: int = 4
    fast_dim: int = 2560
    fast_n_head: int = 32
    fast_n_local_heads: int = 8
    fast_head_dim: int = 128
    fast_intermediate_size: int = 9728
    fast_attention_qk_norm: bool = False
    codebook_size: int = 4096  # fast-AR vocabulary = semantic codebook size
    num_codebooks: int = 10
    # token ids
    semantic_begin_id: int = 151678
    semantic_end_id: int = 155773
    eos_token_id: int = 151645  # <|im_end|>
    pad_token_id: int = 151669
    audio_pad_token_id: int = 151677
    # hard-wired on for fish_qwen3_omni in upstream's config flattening
    scale_codebook_embeddings: bool = True
    norm_fastlayer_input: bool = True

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_local_heads * self.head_dim

    @property
    def fast_q_dim(self) -> int:
        return self.fast_n_head * self.fast_head_dim

    @property
    def fast_kv_dim(self) -> int:
        return self.fast_n_local_heads * self.fast_head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "S2Config":
        """Parse a released `config.json` (model_type fish_qwen3_omni with text_config / audio_decoder_config)."""
        try:
            if cfg.get("model_type") != "fish_qwen3_omni":
                raise CheckpointError(
                    f"config.json: model_type is {cfg.get('model_type')!r}, expected 'fish_qwen3_omni' (Fish Audio S2 Pro)"
                )
            t, a = cfg["text_config"], cfg["audio_decoder_config"]
            n_head = int(t["n_head"])
            fast_n_head = int(a["n_head"])
            return cls(
                vocab_size=int(t["vocab_size"]),
                n_layer=int(t["n_layer"]),
                dim=int(t["dim"]),
                n_head=n_head,
                n_local_heads=int(t.get("n_local_heads", n_head)),
                head_dim=int(t.get("head_dim", 64)),
                intermediate_size=int(t["intermediate_size"]),
                rope_base=float(t.get("rope_base", 10000.0)),
                norm_eps=float(t.get("norm_eps", 1e-5)),
                max_seq_len=int(t.get("max_seq_len", 32768)),
                attention_qk_norm=bool(t.get("attention_qk_norm", False)),
                tie_word_embeddings=bool(t.get("tie_word_embeddings", True)),
                n_fast_layer=int(a["n_layer"]),
                fast_dim=int(a["dim"]),
                fast_n_head=fast_n_head,
                fast_n_local_heads=int(a.get("n_local_heads", fast_n_head)),
                fast_head_dim=int(a.get("head_dim", 64)),
                fast_intermediate_size=int(a["intermediate_size"]),
                fast_attention_qk_norm=bool(a.get("attention_qk_norm", False)),
                codebook_size=int(a["vocab_size"]),
                num_codebooks=int(a["num_codebooks"]),
                semantic_begin_id=int(cfg["semantic_start_token_id"]),
                semantic_end_id=int(cfg["semantic_end_token_id"]),
                eos_token_id=int(cfg.get("eos_token_id", 151645)),
                pad_token_id=int(cfg.get("pad_token_id", 151669)),
                audio_pad_token_id=int(cfg.get("audio_pad_token_id", 151677)),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: bad value: {e}") from None

    def to_hf_config(self) -> dict:
        """The released `config.json` layout for these values (inverse of `from_hf_config`)."""
        common = dict(
            dropout=0.0, attention_qkv_bias=False, attention_o_bias=False, use_gradient_checkpointing=False,
            initializer_range=self.dim ** -0.5,
        )
        text = dict(
            model_type="fish_qwen3", vocab_size=self.vocab_size, n_layer=self.n_layer, dim=self.dim,
            n_head=self.n_head, n_local_heads=self.n_local_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, rope_base=self.rope_base, norm_eps=self.norm_eps,
            max_seq_len=self.max_seq_len, attention_qk_norm=self.attention_qk_norm,
            tie_word_embeddings=self.tie_word_embeddings, **common,
        )
        audio = dict(
            model_type="fish_qwen3_audio_decoder", vocab_size=self.codebook_size, n_layer=self.n_fast_layer,
            dim=self.fast_dim, n_head=self.fast_n_head, n_local_heads=self.fast_n_local_heads,
            head_dim=self.fast_head_dim, intermediate_size=self.fast_intermediate_size, rope_base=self.rope_base,
            norm_eps=self.norm_eps, max_seq_len=self.num_codebooks + 1,
            attention_qk_norm=self.fast_attention_qk_norm, tie_word_embeddings=False,
            num_codebooks=self.num_codebooks, text_dim=self.dim, **common,
        )
        return dict(
            model_type="fish_qwen3_omni", dtype="bfloat16", eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, audio_pad_token_id=self.audio_pad_token_id,
            semantic_start_token_id=self.semantic_begin_id, semantic_end_token_id=self.semantic_end_id,
            text_config=text, audio_decoder_config=audio,
        )

    def replace(self, **kw) -> "S2Config":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class CodecConfig:
    """Hyper-parameters of the modded DAC codec. Defaults are S2 Pro's (fish_speech/configs/modded_dac_vq.yaml).

    The checkpoint reader derives these from tensor shapes, so smaller synthetic codecs load with the same code.
    """

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    latent_dim: int = 1024  # = encoder_dim * 2 ** len(encoder_rates); also the quantizer's input dim
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    encoder_transformer_window: int = 512
    codebook_dim: int = 8
    semantic_codebook_size: int = 4096
    n_residual_codebooks: int = 9
    residual_codebook_size: int = 1024
    downsample_factor: tuple[int, ...] = (2, 2)
    # the quantizer's pre/post windowed transformers (and, with the same widths, the encoder transformer)
    rvq_n_layer: int = 8
    n_head: int = 16
    head_dim: int = 64
    intermediate_size: int = 3072
    rvq_window: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def hop_length(self) -> int:
        """Waveform samples per encoder latent step."""
        return _prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        """Waveform samples per code frame (2048 for S2 Pro)."""
        return self.hop_length * _prod(self.downsample_factor)

    @property
    def n_codebooks(self) -> int:
        return 1 + self.n_residual_codebooks

    def replace(self, **kw) -> "CodecConfig":
        return dataclasses.replace(self, **kw)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tensor names. "HF names" are the released safetensors names; "model names" are fish-speech's names after its
# fish_qwen3_omni key remap, which s2.cpp's GGUF files also use.
# ---------------------------------------------------------------------------------------------------------------

SLOW_PREFIX = "text_model.model."
FAST_PREFIX = "audio_decoder."
CODEC_GGUF_PREFIX = "c."

# Linear weights of one transformer block, in checkpoint order.
LINEAR_KINDS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def model_tensor_shapes(cfg: S2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released model safetensors: HF name -> PyTorch shape, in the release's order."""
    shapes: dict[str, tuple[int, ...]] = {SLOW_PREFIX + "embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layer):
        p = f"{SLOW_PREFIX}layers.{i}."
        shapes[p + "attention.wqkv.weight"] = (cfg.q_dim + 2 * cfg.kv_dim, cfg.dim)
        shapes[p + "attention.wo.weight"] = (cfg.dim, cfg.q_dim)
        if cfg.attention_qk_norm:
            shapes[p + "attention.q_norm.weight"] = (cfg.head_dim,)
            shapes[p + "attention.k_norm.weight"] = (cfg.head_dim,)
        shapes[p + "feed_forward.w1.weight"] = (cfg.intermediate_size, cfg.dim)
        shapes[p + "feed_forward.w3.weight"] = (cfg.intermediate_size, cfg.dim)
        shapes[p + "feed_forward.w2.weight"] = (cfg.dim, cfg.intermediate_size)
        shapes[p + "attention_norm.weight"] = (cfg.dim,)
        shapes[p + "ffn_norm.weight"] = (cfg.dim,)
    shapes[SLOW_PREFIX + "norm.weight"] = (cfg.dim,)
    shapes[FAST_PREFIX + "codebook_embeddings.weight"] = (cfg.codebook_size * cfg.num_codebooks, cfg.dim)
    shapes[FAST_PREFIX + "embeddings.weight"] = (cfg.codebook_size, cfg.fast_dim)
    for j in range(cfg.n_fast_layer):
        p = f"{FAST_PREFIX}layers.{j}."
        shapes[p + "attention.wqkv.weight"] = (cfg.fast_q_dim + 2 * cfg.fast_kv_dim, cfg.fast_dim)
        shapes[p + "attention.wo.weight"] = (cfg.fast_dim, cfg.fast_q_dim)
        if cfg.fast_attention_qk_norm:
            shapes[p + "attention.q_norm.weight"] = (cfg.fast_head_dim,)
            shapes[p + "attention.k_norm.weight"] = (cfg.fast_head_dim,)
        shapes[p + "feed_forward.w1.weight"] = (cfg.fast_intermediate_size, cfg.fast_dim)
        shapes[p + "feed_forward.w3.weight"] = (cfg.fast_intermediate_size, cfg.fast_dim)
        shapes[p + "feed_forward.w2.weight"] = (cfg.fast_dim, cfg.fast_intermediate_size)
        shapes[p + "attention_norm.weight"] = (cfg.fast_dim,)
        shapes[p + "ffn_norm.weight"] = (cfg.fast_dim,)
    shapes[FAST_PREFIX + "norm.weight"] = (cfg.fast_dim,)
    shapes[FAST_PREFIX + "output.weight"] = (cfg.codebook_size, cfg.fast_dim)
    return shapes


def hf_to_model_name(hf_name: str) -> str:
    """fish-speech's fish_qwen3_omni remap: `text_model.model.X` -> `X`, `audio_decoder.X` -> `fast_X`,
    except the codebook input embeddings, which feed the slow AR."""
    if hf_name.startswith(SLOW_PREFIX):
        return hf_name[len(SLOW_PREFIX):]
    if hf_name == FAST_PREFIX + "codebook_embeddings.weight":
        return "codebook_embeddings.weight"
    if hf_name.startswith(FAST_PREFIX):
        return "fast_" + hf_name[len(FAST_PREFIX):]
    raise CheckpointError(f"cannot map tensor {hf_name!r}: not a text_model.model.* or audio_decoder.* name")


def model_to_hf_name(name: str) -> str:
    """Inverse of `hf_to_model_name`."""
    if name == "codebook_embeddings.weight":
        return FAST_PREFIX + name
    if name.startswith("fast_"):
        return FAST_PREFIX + name[len("fast_"):]
    return SLOW_PREFIX + name


_LAYER_RE = re.compile(r"^(fast_)?layers\.(\d+)\.")


def component_of(name: str) -> str:
    """Which part of the model a GGUF / model-name tensor belongs to: slow_ar, fast_ar, embeddings or codec."""
    if name.startswith(CODEC_GGUF_PREFIX):
        return "codec"
    if name in ("embeddings.weight", "codebook_embeddings.weight", "fast_embeddings.weight"):
        return "embeddings"
    if name.startswith("fast_"):
        return "fast_ar"
    return "slow_ar"


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(2)) if m else None


def is_linear_weight(name: str) -> bool:
    """True for the transformer Linear matrices that `--type` quantizes (wqkv, wo, w1, w2, w3 of either AR)."""
    return _LAYER_RE.match(name) is not None and any(name.endswith(k + ".weight") for k in LINEAR_KINDS)


# ---------------------------------------------------------------------------------------------------------------
# GGUF metadata keys. s2.cpp reads `fish-speech.*` (llama.cpp-style) and `fish_speech.*` (project) keys with strict
# value types; s2conv's own keys live under `s2conv.`.
# ---------------------------------------------------------------------------------------------------------------

ARCH = "fish-speech"
ARCH_KEY_PREFIX = "fish-speech."
FISH_KEY_PREFIX = "fish_speech."
CODEC_KEY_PREFIX = "fish_speech.codec."

# s2conv keys
KEY_VERSION = "s2conv.version"
KEY_LAYOUT_VERSION = "s2conv.layout_version"  # version of the S2 block layouts (docs/formats.md)
KEY_SOURCE_HASH = "s2conv.source.sha256"
KEY_POLICY = "s2conv.policy"  # JSON text of the export policy
KEY_HF_CONFIG = "s2conv.hf_config"  # JSON text of the source config.json
KEY_TENSOR_FORMAT = "s2conv.format.{name}"  # S2 block format of a tensor stored as raw I8 bytes
KEY_TENSOR_SHAPE = "s2conv.shape.{name}"  # its logical PyTorch shape (UINT64 array)
