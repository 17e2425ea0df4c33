"""llama.cpp's C GGUF loader, through the oracle, on files written by gguf-py: what it accepts and what it rejects."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from oracle import ggml  # noqa: F401  (pytest fixture)

from s2conv.quant_formats import get_format

pytestmark = pytest.mark.oracle


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]) -> None:
    writer = GGUFWriter(str(path), arch="s2test")
    writer.add_uint32("general.quantization_version", 2)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sample_tensors(name_len: int = 12) -> dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 512)) * 0.02).astype(np.float32)
    return {
        "norm.weight": (rng.standard_normal(24).astype(np.float32), None),
        "q4k.weight".ljust(name_len, "x"): (get_format("q4_k").quantize(w), GGMLQuantizationType.Q4_K),
        "packed.i8": (rng.integers(-128, 127, (3, 40), dtype=np.int8), None),
    }


def test_c_loader_accepts_gguf_py_file(ggml, tmp_path):  # noqa: F811
    path = tmp_path / "ok.gguf"
    tensors = sample_tensors()
    write_gguf(path, tensors)
    ok, info = ggml.gguf_open(path, read_data=True)
    assert ok, info
    assert info.version == 3 and info.alignment == 32
    assert "general.architecture" in info.keys and "general.quantization_version" in info.keys
    assert [t.name for t in info.tensors] == list(tensors)
    assert [t.type for t in info.tensors] == [GGMLQuantizationType.F32, GGMLQuantizationType.Q4_K,
                                              GGMLQuantizationType.I8]
    assert [t.ne for t in info.tensors] == [(24,), (512, 4), (40, 3)]
    assert [t.size for t in info.tensors] == [24 * 4, 4 * 2 * 144, 3 * 40]
    reader = GGUFReader(str(path))
    for c_tensor, py_tensor in zip(info.tensors, reader.tensors):
        assert info.data_offset + c_tensor.offset == py_tensor.data_offset
    # the data the C loader locates is the quantizer's output
    q4k = info.tensors[1]
    raw = np.fromfile(path, dtype=np.uint8, count=q4k.size, offset=info.data_offset + q4k.offset)
    np.testing.assert_array_equal(raw.reshape(4, -1), tensors[q4k.name][0])


def test_c_loader_name_length_limit(ggml, tmp_path):  # noqa: F811
    """Tensor names must be <= 63 bytes (GGML_MAX_NAME = 64 with the NUL); gguf-py writes longer ones anyway."""
    write_gguf(tmp_path / "63.gguf", sample_tensors(name_len=63))
    ok, info = ggml.gguf_open(tmp_path / "63.gguf")
    assert ok, info
    write_gguf(tmp_path / "64.gguf", sample_tensors(name_len=64))
    ok, message = ggml.gguf_open(tmp_path / "64.gguf")
    assert not ok
    assert "too long" in message and "64" in message


def test_c_loader_rejects_truncated_data(ggml, tmp_path):  # noqa: F811
    path = tmp_path / "cut.gguf"
    write_gguf(path, sample_tensors())
    path.write_bytes(path.read_bytes()[:-200])
    assert ggml.gguf_open(path)[0]  # the header alone is fine...
    ok, message = ggml.gguf_open(path, read_data=True)  # ...the data section is not
    assert not ok and "failed to read tensor data" in message


def test_c_dequantizer_reads_the_file_bytes(ggml, tmp_path):  # noqa: F811
    path = tmp_path / "q.gguf"
    tensors = sample_tensors()
    write_gguf(path, tensors)
    ok, info = ggml.gguf_open(path)
    assert ok, info
    fmt = get_format("q4_k")
    q4k = info.tensors[1]
    raw = np.fromfile(path, dtype=np.uint8, count=q4k.size, offset=info.data_offset + q4k.offset).reshape(4, -1)
    np.testing.assert_array_equal(ggml.dequantize(q4k.type, raw, 512), fmt.dequantize(raw, 512))
