"""Synthetic model sizes (tiny, small, full) and the special-token id layout they share with S2 Pro.

Pure data, no torch: the CLI lists the presets without importing the generator.
"""
from __future__ import annotations

from dataclasses import dataclass

from s2conv.schema import CodecConfig, S2Config

# Qwen's 26 specials + <|pad|>, 7 Fish control tokens, <|audio_pad|>: semantic_begin_id = n_regular + 35.
N_SPECIALS = 35


def token_ids(n_regular: int, codebook_size: int) -> dict[str, int]:
    """The config.json ids implied by the layout: eos (<|im_end|>), pad, audio_pad, semantic begin/end, vocab.

    Regular tokens [0, n_regular), <|endoftext|> = n_regular, <|im_start|> + 1, <|im_end|> + 2, <|pad|> + 26,
    <|audio_pad|> + 34, <|semantic:0|> + 35; vocab padded to a multiple of 8 (155,776 for S2 Pro).
    """
    begin = n_regular + N_SPECIALS
    end = begin + codebook_size - 1
    return dict(eos_token_id=n_regular + 2, pad_token_id=n_regular + 26, audio_pad_token_id=begin - 1,
                semantic_begin_id=begin, semantic_end_id=end, vocab_size=-(-(end + 1) // 8) * 8)


@dataclass(frozen=True)
class Preset:
    """A synthetic model size: the transformer config, the codec config and the number of regular BPE tokens."""

    config: S2Config
    codec: CodecConfig
    n_regular_tokens: int
    description: str


def _with_ids(cfg: S2Config, n_regular: int) -> S2Config:
    return cfg.replace(**token_ids(n_regular, cfg.codebook_size))


# tiny: every matrix input dim is a multiple of 256 (ggml K-quants), 2 slow + 1 fast layer, codebook 256.
# Its codec keeps the architecture (4 encoder/decoder blocks, transformers, 1 + 9 VQs) with hop 128 and
# frame_length 512 samples (86 frames/s at 44.1 kHz).
_TINY = Preset(
    config=_with_ids(S2Config(
        n_layer=2, dim=256, n_head=4, n_local_heads=2, head_dim=64, intermediate_size=512, max_seq_len=4096,
        n_fast_layer=1, fast_dim=256, fast_n_head=4, fast_n_local_heads=2, fast_head_dim=64,
        fast_intermediate_size=512, codebook_size=256), 512),
    codec=CodecConfig(
        encoder_dim=16, encoder_rates=(2, 4, 4, 4), decoder_dim=128, decoder_rates=(4, 4, 4, 2), latent_dim=256,
        encoder_transformer_layers=(0, 0, 0, 1), semantic_codebook_size=256, residual_codebook_size=64,
        rvq_n_layer=1, n_head=4, head_dim=64, intermediate_size=768),
    n_regular_tokens=512,
    description="2+1 layers, dim 256, codebook 256; codec latent 256, frame_length 512",
)
# small: S2 Pro's codec geometry (hop 512, frame 2048) at half width; 4+2 layers of dim 512.
_SMALL = Preset(
    config=_with_ids(S2Config(
        n_layer=4, dim=512, n_head=8, n_local_heads=2, head_dim=64, intermediate_size=1536, max_seq_len=8192,
        n_fast_layer=2, fast_dim=512, fast_n_head=8, fast_n_local_heads=2, fast_head_dim=64,
        fast_intermediate_size=1536, codebook_size=1024), 4096),
    codec=CodecConfig(
        encoder_dim=32, encoder_rates=(2, 4, 8, 8), decoder_dim=512, decoder_rates=(8, 8, 4, 2), latent_dim=512,
        encoder_transformer_layers=(0, 0, 0, 1), semantic_codebook_size=1024, residual_codebook_size=256,
        rvq_n_layer=1, n_head=8, head_dim=64, intermediate_size=1536),
    n_regular_tokens=4096,
    description="4+2 layers, dim 512, codebook 1024; codec latent 512, frame_length 2048",
)
_FULL = Preset(config=S2Config(), codec=CodecConfig(), n_regular_tokens=151643,
               description="S2 Pro shapes: 36+4 layers, dim 2560; 4,561,852,416 + 391,430,530 params")
PRESETS: dict[str, Preset] = {"tiny": _TINY, "small": _SMALL, "full": _FULL}
