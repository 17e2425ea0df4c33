"""The S2 Pro tokenizer rebuilt from a GGUF's `tokenizer.ggml.*` metadata, so no side file is needed.

S2 Pro uses Qwen3's byte-level BPE: NFC normalisation, the Qwen2 split regex, GPT-2 byte-to-unicode mapping, and
added tokens (`<|im_start|>`, `<|semantic:i|>`, ...) matched atomically. llama.cpp's convention stores the vocabulary
as `tokenizer.ggml.tokens` (byte-level strings), `tokenizer.ggml.merges` ("a b" strings) and
`tokenizer.ggml.token_type` (1 normal, 3 control, 4 user-defined, 5 unused).
"""
from __future__ import annotations

import json

from tokenizers import Tokenizer

from s2conv.errors import SchemaError

# Qwen2 / Qwen3 pre-tokenizer split (tokenizer.json "pre_tokenizer" of the release; llama.cpp's pre = "qwen2").
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def build_tokenizer(tokens: list[str], token_types: list[int], merges: list[str]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the release's tokenizer.json for the given vocabulary.

    Normal tokens form the BPE vocabulary; control and user-defined tokens become added tokens at their own ids
    (control ones special); unused tokens (vocabulary padding rows) are left out.
    """
    if len(tokens) != len(token_types):
        raise SchemaError(f"tokenizer: {len(tokens)} tokens but {len(token_types)} token types")
    vocab, added = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, token_types)):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append(dict(id=i, content=tok, single_word=False, lstrip=False, rstrip=False, normalized=False,
                              special=kind == TOKEN_CONTROL))
        elif kind != TOKEN_UNUSED:
            vocab[tok] = i
    for m in merges:
        if " " not in m:
            raise SchemaError(f"tokenizer: malformed merge {m!r}")
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    spec = dict(
        version="1.0", truncation=None, padding=None, added_tokens=added,
        normalizer=dict(type="NFC"),
        pre_tokenizer=dict(type="Sequence", pretokenizers=[
            dict(type="Split", pattern=dict(Regex=QWEN2_SPLIT), behavior="Isolated", invert=False), byte_level]),
        post_processor=None,
        decoder=byte_level,
        model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                   fuse_unk=False, byte_fallback=False, ignore_merges=False, vocab=vocab, merges=list(merges)),
    )
    try:
        return Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises a plain Exception subclass from Rust
        raise SchemaError(f"tokenizer metadata does not form a valid BPE tokenizer: {e}") from None
