"""Hostile checkpoints: safetensors headers that lie about offsets, dtypes or sizes, malicious codec.pth pickles and
non-finite weights are refused with one CheckpointError line naming the file or tensor; nothing is executed."""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

from s2conv.checkpoint import open_checkpoint
from s2conv.converter import Policy, export_gguf
from s2conv.errors import CheckpointError, S2ConvError

SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes, pad: bool = True) -> None:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _lie(kind: str):
    """edit(header, data) -> (header, data) for one kind of lying header."""
    def edit(h, data):
        name = _first(h)
        e = h[name]
        b, end = e["data_offsets"]
        if kind == "offsets past the end":
            e["data_offsets"] = [b + len(data), end + len(data)]
        elif kind == "offsets overlap":
            second = [k for k in h if k not in ("__metadata__", name)][0]
            h[second]["data_offsets"] = [b, b + (h[second]["data_offsets"][1] - h[second]["data_offsets"][0])]
        elif kind == "dtype size lies":
            e["dtype"] = "F32" if e["dtype"] != "F32" else "F16"
        elif kind == "unknown dtype":
            e["dtype"] = "Q4_K"
        elif kind == "string offsets":
            e["data_offsets"] = ["0", "10"]
        elif kind == "float offsets":
            e["data_offsets"] = [0.5, float(end) + 0.5]
        elif kind == "negative offsets":
            e["data_offsets"] = [-8, end - 8]
        elif kind == "negative shape":
            e["shape"] = [-1 * d for d in e["shape"]] if len(e["shape"]) % 2 == 0 else [-1, -e["shape"][0]]
        elif kind == "huge shape":
            e["shape"] = [2**62, 2**62]
        elif kind == "shape not a list":
            e["shape"] = "12"
        elif kind == "entry not an object":
            h[name] = [1, 2, 3]
        elif kind == "metadata not a dict":
            h["__metadata__"] = [1]
        elif kind == "three offsets":
            e["data_offsets"] = [b, end, end]
        elif kind == "bool dims":
            e["shape"] = [True] * len(e["shape"])
        return h, data
    return edit


LIES = ["offsets past the end", "offsets overlap", "dtype size lies", "unknown dtype", "string offsets",
        "float offsets", "negative offsets", "negative shape", "huge shape", "shape not a list",
        "entry not an object", "three offsets", "bool dims"]


@pytest.mark.parametrize("kind", LIES)
def test_lying_safetensors_header_is_one_line_error(ckpt, kind):
    h, data = _header(ckpt / SHARD)
    h, data = _lie(kind)(h, data)
    _write(ckpt / SHARD, h, data)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and SHARD in msg, msg


@pytest.mark.parametrize("blob, fragment", [
    (struct.pack("<Q", 2**63) + b"{}", "truncated safetensors header"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
    (b"\x01\x02", "truncated safetensors file"),
])
def test_broken_safetensors_prefix(ckpt, blob, fragment):
    (ckpt / SHARD).write_bytes(blob)
    with pytest.raises(CheckpointError, match=fragment):
        open_checkpoint(ckpt)


class _Exec:
    """Unpickling this runs exec() of a payload: weights_only loading must refuse it before running anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_codec_through_the_cli_is_refused_and_not_executed(ckpt, tmp_path):
    """`s2conv info` and `s2conv export` on a checkpoint whose codec.pth runs code when unpickled."""
    marker = tmp_path / "pwned"
    sd = torch.load(ckpt / "codec.pth", weights_only=True)
    sd["nested"] = {"deeper": [_Exec(marker)]}
    torch.save({"state_dict": sd}, ckpt / "codec.pth")
    from s2conv.cli import main

    for args in (["info", str(ckpt)], ["export", str(ckpt), "--type", "q4", "-o", str(tmp_path / "x.gguf")]):
        old = sys.argv
        sys.argv = ["s2conv", *args]
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            sys.argv = old
        assert e.value.code == 1
    assert not marker.exists() and not (tmp_path / "x.gguf").exists()


def test_non_finite_weights_are_named_and_refused_by_export(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    t = load_file(ckpt / SHARD)
    name = "text_model.model.layers.0.feed_forward.w1.weight"
    if name not in t:
        name = next(k for k in t if k.endswith("w1.weight"))
    t[name][1, 2] = float("nan")
    save_file(t, ckpt / SHARD, metadata={"format": "pt"})
    out = tmp_path / "nan.gguf"
    with pytest.raises(S2ConvError) as e:
        export_gguf(ckpt, out, Policy.from_options(type="q4"), tokenizer_json=False)
    assert "feed_forward.w1" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name != "ckpt"] == []
