"""Build a Qwen-style byte-level BPE tokenizer with S2 Pro's special-token id layout, for synthetic checkpoints.

Id layout (spec §1.3), with R regular BPE tokens (R = 151,643 for S2 Pro):
  [0, R)            byte alphabet + merges (learned from a built-in English text, then fabricated deterministically)
  R .. R+25         Qwen specials (<|endoftext|> = R, <|im_start|>, <|im_end|>, ... </think>)
  R+26 .. R+34      <|pad|>, <|phoneme_start|>, <|phoneme_end|>, <|text|>, <|voice|>, <|interleave|>,
                    <|audio_start|>, <|audio_end|>, <|audio_pad|>
  R+35 ..           <|semantic:0|> ... <|semantic:{codebook_size-1}|>; the embedding is padded past them.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from s2conv.checkpoint.presets import N_SPECIALS
from s2conv.errors import CheckpointError

# Qwen2's split regex (contractions, letter runs with one optional leading non-letter, single digits, punctuation
# runs, newlines, whitespace).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
FISH_SPECIALS = (
    "<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|text|>", "<|voice|>", "<|interleave|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
)


def semantic_token(i: int) -> str:
    return f"<|semantic:{i}|>"


_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Speech synthesis turns written text into spoken audio.
A good voice sounds natural, clear and expressive; it pauses at commas and rises at questions.
Hello, how are you today? I am fine, thank you. Where is the station? It is two streets from here.
Numbers like 12, 345 and 6789 are read digit by digit by some systems and as words by others.
She said: "I'll be there at seven o'clock." They've already left, haven't they? We're nearly done.
In the beginning the model learns short words, then longer ones, and finally whole phrases that repeat often.
Weather today: sunny with a light breeze from the west, temperatures between eighteen and twenty-four degrees.
""" * 3


def build_tokenizer(n_regular: int, codebook_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly n_regular regular tokens, then the specials and semantic tokens.

    Deterministic. For S2 Pro size (n_regular = 151,643) this takes a few seconds: after the merges learned from
    the built-in text, the rest are fabricated as (token, byte-character) concatenations in a fixed order.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_regular < len(alphabet):
        raise CheckpointError(f"tokenizer: n_regular={n_regular} is smaller than the 256-symbol byte alphabet")
    probe = Tokenizer(models.BPE())
    probe.normalizer = normalizers.NFC()
    probe.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=min(n_regular, 2000), initial_alphabet=sorted(alphabet),
                                  show_progress=False, min_frequency=2)
    probe.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    learned = json.loads(probe.to_str())["model"]
    vocab = {tok: i for tok, i in sorted(learned["vocab"].items(), key=lambda kv: kv[1])}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1])[:n_regular])
    merges = [m for m in merges if m[0] + m[1] in vocab]
    _fabricate_merges(vocab, merges, n_regular, sorted(alphabet))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    specials = list(QWEN_SPECIALS) + list(FISH_SPECIALS) + [semantic_token(i) for i in range(codebook_size)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if tok.token_to_id(QWEN_SPECIALS[0]) != n_regular:
        raise CheckpointError(f"tokenizer: <|endoftext|> got id {tok.token_to_id(QWEN_SPECIALS[0])}, "
                              f"expected {n_regular}")
    return tok


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _fabricate_merges(vocab: dict[str, int], merges: list, n_regular: int, alphabet: list[str]) -> None:
    """Append merges (left token, one byte-character) in a fixed order until the vocabulary has n_regular tokens."""
    frontier = list(alphabet)
    while len(vocab) < n_regular:
        grown = []
        for left in frontier:
            for ch in alphabet:
                new = left + ch
                if new in vocab:
                    continue
                vocab[new] = len(vocab)
                merges.append((left, ch))
                grown.append(new)
                if len(vocab) == n_regular:
                    return
        frontier = grown


def write_tokenizer_files(out_dir: Path, n_regular: int, codebook_size: int) -> None:
    """Write tokenizer.json and a tokenizer_config.json with added_tokens_decoder, as the release has."""
    tok = build_tokenizer(n_regular, codebook_size)
    (out_dir / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    added = {}
    specials = list(QWEN_SPECIALS) + list(FISH_SPECIALS) + [semantic_token(k) for k in range(codebook_size)]
    for i, s in enumerate(specials):
        added[str(n_regular + i)] = dict(content=s, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                         special=True)
    cfg = dict(add_bos_token=False, add_prefix_space=False, added_tokens_decoder=added, bos_token=None,
               clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
               model_max_length=32768, pad_token="<|pad|>", split_special_tokens=False,
               tokenizer_class="Qwen2Tokenizer", unk_token=None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a tokenizer.json (file, or a checkpoint directory containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclass for any parse problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load tokenizer: {first}") from None
