"""Well-formed GGUF files whose metadata or tensors do not describe a usable S2 model: the runtime loader (and
`s2conv synth`) refuse them with one SchemaError line, quickly, without building absurdly large models."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as V

from gguf_edit import rewrite
from s2conv.converter import Policy, export_gguf
from s2conv.errors import SchemaError
from s2conv.runtime.loader import load_model

CB = "c.quantizer.quantizer.quantizers.0.codebook.weight"


@pytest.fixture(scope="module")
def q4(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("schema") / "q4.gguf"
    export_gguf(tiny_checkpoint, out, Policy.from_options(type="q4"), tokenizer_json=False)
    return out


def _codebook(q4, rows_delta: int) -> dict:
    t = next(t for t in GGUFReader(q4).tensors if t.name == CB)
    rows, cols = int(t.shape[1]), int(t.shape[0])
    return {CB: np.zeros((rows + rows_delta, cols), np.float16)}


CASES = {
    "block_count is FLOAT32": (dict(replace={"fish-speech.block_count": (2.0, V.FLOAT32)}), "expected int"),
    "qk_norm is UINT8": (dict(replace={"fish_speech.attention_qk_norm": (1, V.UINT8)}), "expected bool"),
    "block_count 2**31": (dict(replace={"fish-speech.block_count": (2**31, V.UINT32)}), "block_count is 2147483648"),
    "fast_block_count 0": (dict(replace={"fish_speech.fast_block_count": (0, V.UINT32)}), "fast_block_count is 0"),
    "block_count missing": (dict(drop=("fish-speech.block_count",)), "block_count is 36"),
    "head_count 0": (dict(replace={"fish-speech.attention.head_count": (0, V.UINT32)}), "layers.0.attention.wqkv"),
    "tokens missing": (dict(drop=("tokenizer.ggml.tokens",)), "tokenizer.ggml.tokens"),
    "architecture llama": (dict(replace={"general.architecture": ("llama", V.STRING)}), "not an S2 Pro model"),
    "codec window is a string": (dict(replace={"fish_speech.codec.rvq_transformer.window_size": ("x", V.STRING)}),
                                 "cannot build the model"),
    "codec tensor missing": (dict(drop_tensors=("c.decoder.model.0.conv.weight",)), "no weight for"),
    "codebook one row short": ("codebook", "codec tensors do not fit together"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_s2_metadata_is_one_schema_error(q4, tmp_path, name):
    edit, fragment = CASES[name]
    if edit == "codebook":
        edit = dict(tensors=_codebook(q4, -1))
    path = rewrite(q4, tmp_path / "bad.gguf", **edit)
    t0 = time.perf_counter()
    with pytest.raises(SchemaError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg, msg
    assert time.perf_counter() - t0 < 60  # refused, not built (2**31 layers took minutes before the check)


def test_synth_cli_on_bad_metadata_is_one_line(q4, tmp_path, monkeypatch, capsys):
    from s2conv.cli import main

    path = rewrite(q4, tmp_path / "bad.gguf", replace={"fish-speech.block_count": (2**31, V.UINT32)})
    monkeypatch.setattr(sys, "argv", ["s2conv", "synth", str(path), "--text", "hi", "-o", str(tmp_path / "o.wav"),
                                      "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.wav").exists()
