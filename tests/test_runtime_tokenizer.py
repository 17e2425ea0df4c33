"""The runtime rebuilds the tokenizer from GGUF-style metadata; it must encode exactly like the tokenizer.json."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from s2conv.errors import SchemaError
from s2conv.runtime.tokenizer import QWEN2_SPLIT, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, build_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. It's 12:30, isn't it?",
          "Every atom in your body came from a star that exploded. We are all made of star stuff.",
          "Café déjà vu — naïve coöperation; 東京 and Zürich.\n\nNew lines  and   spaces."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|voice|>"] + [f"<|semantic:{i}|>" for i in range(8)]


def reference_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.normalizer = __import__("tokenizers").normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS)
    return tok


def as_gguf_metadata(tok: Tokenizer, pad_to: int):
    """What an exporter writes: tokens by id, their types, merges as 'a b' strings; padding rows unused."""
    spec = json.loads(tok.to_str())
    n = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    tokens, types = [""] * n, [TOKEN_NORMAL] * n
    for t, i in spec["model"]["vocab"].items():
        tokens[i] = t
    for a in spec["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], TOKEN_CONTROL
    for i in range(n, pad_to):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


@pytest.mark.parametrize("text", CORPUS[:3] + [
    "<|im_start|>user\nHello<|im_end|>", "<|speaker:0|>Hi [laugh] there", "  leading spaces\ttabs\r\n",
    "<|semantic:3|><|semantic:7|>", "unseen wörds ßtraße 1234567", ""])
def test_rebuilt_tokenizer_encodes_like_the_original(text):
    ref = reference_tokenizer()
    tokens, types, merges = as_gguf_metadata(ref, pad_to=ref.get_vocab_size() + 5)
    rebuilt = build_tokenizer(tokens, types, merges)
    assert rebuilt.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids
    assert rebuilt.decode(ref.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_keep_their_ids_and_match_atomically():
    ref = reference_tokenizer()
    rebuilt = build_tokenizer(*as_gguf_metadata(ref, pad_to=0))
    for s in SPECIALS:
        assert rebuilt.token_to_id(s) == ref.token_to_id(s)
    ids = rebuilt.encode("a<|im_end|>b", add_special_tokens=False).ids
    assert rebuilt.token_to_id("<|im_end|>") in ids


def test_inconsistent_metadata_is_a_schema_error():
    with pytest.raises(SchemaError, match="token types"):
        build_tokenizer(["a", "b"], [1], [])
    with pytest.raises(SchemaError, match="malformed merge"):
        build_tokenizer(["a", "b", "ab"], [1, 1, 1], ["ab"])
