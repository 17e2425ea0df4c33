"""The synthetic Qwen-style tokenizer and its agreement with config.json ids."""
import json

from s2conv.checkpoint import PRESETS, load_tokenizer, open_checkpoint
from s2conv.checkpoint.tokenizer_build import FISH_SPECIALS, QWEN_SPECIALS, build_tokenizer, semantic_token


def test_chat_markup_specials_are_atomic(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    tok = load_tokenizer(ckpt.tokenizer_path)
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>", add_special_tokens=False).ids
    eos = ckpt.config.eos_token_id
    assert ids[0] == eos - 1 and ids[-1] == eos and len(ids) >= 4
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello<|im_end|>"
    # <|speaker:N|> is plain text: several BPE tokens, none of them special
    spk = tok.encode("<|speaker:0|>", add_special_tokens=False).ids
    assert len(spk) > 1 and max(spk) < ckpt.config.eos_token_id - 2


def test_ids_agree_with_config(tiny_checkpoint):
    cfg = open_checkpoint(tiny_checkpoint).config
    tok = load_tokenizer(tiny_checkpoint)
    assert tok.token_to_id("<|pad|>") == cfg.pad_token_id
    assert tok.token_to_id("<|audio_pad|>") == cfg.audio_pad_token_id
    assert tok.token_to_id(semantic_token(0)) == cfg.semantic_begin_id
    assert tok.token_to_id(semantic_token(cfg.codebook_size - 1)) == cfg.semantic_end_id
    assert cfg.semantic_end_id - cfg.semantic_begin_id + 1 == cfg.codebook_size
    assert tok.get_vocab_size() == cfg.semantic_end_id + 1 <= cfg.vocab_size < cfg.semantic_end_id + 9
    order = [tok.token_to_id(s) for s in QWEN_SPECIALS + FISH_SPECIALS]
    assert order == list(range(order[0], order[0] + 35))
    added = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added[str(cfg.eos_token_id)]["content"] == "<|im_end|>" and len(added) == 35 + cfg.codebook_size


def test_full_size_layout_matches_s2_pro_ids():
    cfg = PRESETS["full"].config
    tok = build_tokenizer(151_643, 4096)
    assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("<|im_end|>") == cfg.eos_token_id == 151645
    assert tok.token_to_id("<|pad|>") == 151669 and tok.token_to_id("<|voice|>") == 151673
    assert tok.token_to_id("<|audio_pad|>") == 151677 and tok.token_to_id(semantic_token(4095)) == 155773
    assert tok.token_to_id("\u010a") == 198  # "\n", as in Qwen
    assert tok.encode("Hello world", add_special_tokens=False).ids  # ordinary text encodes
