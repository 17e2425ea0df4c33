"""`s2conv inspect`: reads s2conv files and any other GGUF; malformed files give one GGUFFormatError line."""
import json

import numpy as np
import pytest
from gguf import GGUFWriter

from s2conv.checkpoint import make_checkpoint
from s2conv.converter.export import export_gguf
from s2conv.converter.inspect_gguf import format_inspect, inspect_gguf
from s2conv.converter.policy import Policy
from s2conv.errors import GGUFFormatError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("insp")
    ckpt = make_checkpoint("tiny", root / "tiny")
    out = root / "m.gguf"
    r = export_gguf(ckpt, out, Policy(type="q4_k_m", target="all"), tokenizer_json=False)
    return out, r.plan


def test_inspect_reports_every_tensor_and_component_sizes(exported):
    path, plan = exported
    info = inspect_gguf(path)
    assert info["file_bytes"] == plan.file_bytes and info["version"] == 3
    assert [(t["name"], t["type"], t["bytes"]) for t in info["tensors"]] == \
        [(r.name, r.ggml_type, r.nbytes) for r in plan.rows]
    assert [t["shape"] for t in info["tensors"]] == [list(r.shape) for r in plan.rows]
    for comp in ("slow_ar", "fast_ar", "embeddings", "codec", "total"):
        assert info["summary"][comp]["bytes"] == plan.summary[comp]["bytes"]
    assert info["problems"] == []
    keys = {m["key"]: m for m in info["metadata"]}
    assert keys["fish_speech.attention_qk_norm"]["value"] is True
    assert keys["tokenizer.ggml.tokens"]["value"][-1].startswith("...")  # long arrays shortened
    text = format_inspect(info)
    assert "layers.0.attention.wqkv.weight" in text and "Q6_K" in text


def _foreign(path, nested: bool = False, long_name: bool = False):
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 1)
    if nested:
        w.add_key_value("nested", [[1, 2], [3]], __import__("gguf").GGUFValueType.ARRAY)
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 8), np.float32))
    w.add_tensor("x" * (70 if long_name else 7), np.ones((2,), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_inspect_reads_foreign_gguf_and_refuses_what_the_c_loader_refuses(tmp_path):
    info = inspect_gguf(_foreign(tmp_path / "foreign.gguf"))
    assert [t["name"] for t in info["tensors"]] == ["blk.0.attn_q.weight", "x" * 7]
    assert info["tensors"][0]["shape"] == [4, 8] and info["tensors"][0]["component"] == "all"
    assert info["problems"] == []
    json.dumps(info)  # JSON-ready
    # gguf-py writes nested arrays and 70-byte names; the ggml C loader (and so s2conv's validator) rejects them
    with pytest.raises(GGUFFormatError, match="nested array"):
        inspect_gguf(_foreign(tmp_path / "nested.gguf", nested=True))
    with pytest.raises(GGUFFormatError, match="70 bytes, more than ggml's 63"):
        inspect_gguf(_foreign(tmp_path / "long.gguf", long_name=True))


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10, "truncate"])
def test_malformed_files_give_one_line_errors(tmp_path, exported, content):
    path = tmp_path / "bad.gguf"
    if content == "truncate":
        content = exported[0].read_bytes()[:1000]
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError) as e:
        inspect_gguf(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFFormatError, match="no such file"):
        inspect_gguf(tmp_path / "nope.gguf")
