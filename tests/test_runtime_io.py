"""Prompt building, resampling and WAV I/O of the runtime."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from s2conv.errors import RuntimeModelError
from s2conv.runtime import audio, prompt


def test_split_by_speaker_drops_text_before_first_tag_and_keeps_tags():
    text = "ignored <|speaker:0|>Hello there. <|speaker:1|> Hi!\n<|speaker:0|>Bye"
    assert prompt.split_text_by_speaker(text) == ["<|speaker:0|>Hello there.", "<|speaker:1|> Hi!",
                                                  "<|speaker:0|>Bye"]
    assert prompt.split_text_by_speaker("no tags at all") == []
    assert prompt.text_batches("no tags at all") == ["no tags at all"]


def test_group_turns_by_count_and_bytes():
    turns = [f"<|speaker:{i % 2}|>" + "x" * 10 for i in range(12)]
    batches = prompt.group_turns(turns, max_turns=5, max_bytes=10_000)
    assert [b.count("\n") + 1 for b in batches] == [5, 5, 2]
    batches = prompt.group_turns(turns, max_turns=5, max_bytes=50)  # 25 bytes a turn: two fit
    assert [b.count("\n") + 1 for b in batches] == [2] * 6
    assert prompt.group_turns(["x" * 100], max_bytes=10) == ["x" * 100]  # one oversized turn still goes alone


def _tokenizer():
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz \n:<>|_")},
                                     unk_token="_"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|voice|>"])
    return tok


def test_encode_parts_tokenizes_each_text_part_and_maps_codes():
    tok = _tokenizer()
    codes = torch.tensor([[3, 4], [1, 2], [5, 6]])  # 3 codebooks, 2 frames
    out = prompt.encode_parts(tok, ["ab", "<|im_end|>", codes], semantic_begin_id=100, num_codebooks=3)
    assert out.shape == (4, 5)
    assert out[0].tolist() == [0, 1, tok.token_to_id("<|im_end|>"), 103, 104]
    assert out[1:, :3].abs().sum() == 0 and out[1:, 3:].tolist() == codes.tolist()
    with pytest.raises(RuntimeModelError, match="codes must be"):
        prompt.encode_parts(tok, [codes[:2]], semantic_begin_id=100, num_codebooks=3)


def test_generation_prompt_layout_matches_upstream_conversation():
    codes = torch.zeros(10, 4, dtype=torch.long)
    history = [prompt.system_message(["ref words"], [codes])]
    parts = prompt.generation_prompt(history, "Hello")
    texts = [p for p in parts if isinstance(p, str)]
    assert texts == ["<|im_start|>system\n",
                     "convert the provided text to speech reference to the following:\n\nText:\n",
                     "<|speaker:0|>ref words", "\n\nSpeech:\n", "<|im_end|>\n",
                     "<|im_start|>user\n", "Hello", "<|im_end|>\n",
                     "<|im_start|>assistant\n<|voice|>"]
    assert prompt.generation_prompt([prompt.system_message()], "x")[1] == "convert the provided text to speech"


@pytest.mark.parametrize("orig, new", [(48000, 44100), (16000, 44100), (44100, 22050)])
def test_resample_keeps_an_in_band_sine_and_length(orig, new):
    f = 440.0
    n = orig  # one second
    x = torch.sin(2 * math.pi * f * torch.arange(n, dtype=torch.float64) / orig)
    y = audio.resample(x, orig, new)
    assert y.shape[-1] == math.ceil(n * new / orig)
    ref = torch.sin(2 * math.pi * f * torch.arange(y.shape[-1], dtype=torch.float64) / new)
    mid = slice(200, -200)  # edges see the zero padding
    assert torch.max(torch.abs(y[mid] - ref[mid])) < 2e-3


def test_resample_removes_content_above_the_new_nyquist():
    orig, new = 48000, 16000
    x = torch.sin(2 * math.pi * 15000 * torch.arange(orig, dtype=torch.float64) / orig)  # above 8 kHz
    y = audio.resample(x, orig, new)
    assert y[200:-200].abs().max() < 0.02


def test_load_audio_mixes_down_and_resamples(tmp_path):
    sr = 22050
    t = np.arange(sr) / sr
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.zeros_like(t)], axis=1).astype(np.float32)
    sf.write(tmp_path / "ref.wav", stereo, sr)
    wav = audio.load_audio(tmp_path / "ref.wav", 44100)
    assert wav.shape == (44100,)
    assert abs(wav[1000:-1000].abs().max().item() - 0.5) < 0.01  # the silent channel halves the amplitude


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 10])
def test_unreadable_audio_is_one_clear_error(tmp_path, content):
    p = tmp_path / "bad.wav"
    p.write_bytes(content)
    with pytest.raises(RuntimeModelError, match="bad.wav"):
        audio.load_audio(p, 44100)
    with pytest.raises(RuntimeModelError, match="cannot read"):
        audio.load_audio(tmp_path / "missing.wav", 44100)


def test_save_wav_round_trips_and_leaves_nothing_on_failure(tmp_path):
    wav = torch.linspace(-0.5, 0.5, 2048)
    audio.save_wav(tmp_path / "out.wav", wav, 44100)
    data, sr = sf.read(tmp_path / "out.wav")
    assert sr == 44100 and np.allclose(data, wav.numpy(), atol=1e-4)
    with pytest.raises(RuntimeModelError, match="cannot write"):
        audio.save_wav(tmp_path / "no_such_dir" / "out.wav", wav, 44100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
