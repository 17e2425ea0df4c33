"""`s2conv unpack`: a bf16 export unpacks to the original checkpoint (model exact; codec exact up to weight-norm
re-folding), and the result loads with the checkpoint reader."""
import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from s2conv.checkpoint import make_checkpoint, open_checkpoint
from s2conv.codec_schema import fold_weight_norm, is_transposed_conv, weight_norm_pairs
from s2conv.converter.export import export_gguf
from s2conv.converter.policy import Policy
from s2conv.converter.unpack import unpack_gguf
from s2conv.errors import ConversionError, SchemaError


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    root = tmp_path_factory.mktemp("unpack")
    src = make_checkpoint("tiny", root / "tiny")
    gguf = root / "m.gguf"
    export_gguf(src, gguf, Policy(type="bf16", codec_type="f32"), tokenizer_json=False)
    out = root / "back"
    unpack_gguf(gguf, out)
    return src, gguf, out


def test_bf16_export_unpacks_to_the_original(roundtrip):
    src, _, out = roundtrip
    a, b = open_checkpoint(src), open_checkpoint(out)
    assert a.model_names() == b.model_names()
    for n in a.model_names():
        assert b.model_dtype(n) == torch.bfloat16
        assert torch.equal(a.model_tensor(n), b.model_tensor(n)), n
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert a.codec_names() == b.codec_names()
    pairs = weight_norm_pairs(a.codec_names())
    in_pair = {n for gv in pairs.values() for n in gv}
    for n in a.codec_names():
        if n not in in_pair:
            assert torch.equal(a.codec_tensor(n), b.codec_tensor(n)), n
    for folded, (g, v) in pairs.items():
        t = is_transposed_conv(v)
        wa = fold_weight_norm(a.codec_tensor(g), a.codec_tensor(v), t)
        wb = fold_weight_norm(b.codec_tensor(g), b.codec_tensor(v), t)
        torch.testing.assert_close(wb, wa, rtol=2e-6, atol=1e-7, msg=folded)


def test_unpack_refuses_existing_dir_and_non_s2conv_files(roundtrip, tmp_path):
    src, gguf, out = roundtrip
    with pytest.raises(ConversionError, match="--force"):
        unpack_gguf(gguf, out)
    foreign = tmp_path / "f.gguf"
    w = GGUFWriter(foreign, "llama")
    w.add_tensor("a", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SchemaError, match="s2conv.hf_config"):
        unpack_gguf(foreign, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p for p in tmp_path.iterdir() if "s2conv-tmp" in p.name] == []
