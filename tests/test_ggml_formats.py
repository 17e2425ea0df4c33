"""The standard ggml types (f32/f16/bf16, Q8_0, Q4_0/1, Q5_0/1, TQ2_0 and the dequantize-only ones) against gguf-py
(byte for byte, value for value) and, when llama-cpp-python is installed, against llama.cpp's C reference."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from oracle import ggml  # noqa: F401  (fixture)
from s2conv.errors import QuantFormatError
from s2conv.quant_formats import format_for_ggml_type, get_format
from s2conv.quant_formats.float_types import fp32_to_bf16_bits
from s2conv.quant_formats.ggml_common import HALF_DOWN, roundf_int8

QUANTIZABLE = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "tq2_0"]
DEQUANT_ONLY = ["tq1_0", "mxfp4", "nvfp4", "iq4_nl", "iq4_xs", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s",
                "iq1_s", "iq1_m"]
N_COLS = 512  # a multiple of every block size (32, 64, 256)


def gguf_quantize(name: str, w: np.ndarray) -> np.ndarray:
    fmt = get_format(name)
    return np.ascontiguousarray(gq.quantize(w, fmt.ggml_type)).view(np.uint8).reshape(w.shape[0], -1)


def gguf_dequantize(name: str, data: np.ndarray) -> np.ndarray:
    fmt = get_format(name)
    view = {"f32": np.float32, "f16": np.float16}.get(name, np.uint8)
    return gq.dequantize(data.view(view), fmt.ggml_type).reshape(data.shape[0], -1)


def weight_cases(name: str) -> dict[str, np.ndarray]:
    """Named (rows, N_COLS) float32 inputs; magnitudes kept where every format's float16 scales stay finite."""
    rng = np.random.default_rng(sum(map(ord, name)))
    ties = np.tile(np.array([127, -127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5, 63.5, 7.5, -7.5, 8, -8, 15.5, 0.25],
                            dtype=np.float32), (3, N_COLS // 16))
    plus_minus = rng.standard_normal((2, N_COLS), dtype=np.float32)
    plus_minus[:, 5] = 4.0  # +m and -m in the same block: the first one sets the sign of Q4_0/Q5_0 scales
    plus_minus[:, 9] = -4.0
    return {
        "normal": rng.standard_normal((17, N_COLS), dtype=np.float32) * 0.02,
        "one_row": rng.standard_normal((1, N_COLS), dtype=np.float32),
        "three_rows_heavy_tail": (rng.standard_t(2, (3, N_COLS)) * 0.05).astype(np.float32),
        "zeros": np.zeros((3, N_COLS), np.float32),
        "constant_rows": np.repeat(np.array([[1.0], [-0.37], [5e-3]], np.float32), N_COLS, axis=1),
        "tiny": rng.standard_normal((3, N_COLS), dtype=np.float32) * 1e-30,
        "small": rng.standard_normal((3, N_COLS), dtype=np.float32) * 1e-6,
        "huge": rng.standard_normal((3, N_COLS), dtype=np.float32) * 1e4,
        "ties": ties,
        "plus_minus": plus_minus,
        "sparse": rng.standard_normal((3, N_COLS), dtype=np.float32) * (rng.random((3, N_COLS)) < 0.05),
    }


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantize_bytes_equal_gguf_py(name):
    fmt = get_format(name)
    for case, w in weight_cases(name).items():
        w = w + np.float32(0)  # -0.0 -> +0.0: gguf-py and llama.cpp disagree on zero signs (test below)
        ours = fmt.quantize(w, tensor=case)
        assert ours.shape == (w.shape[0], fmt.row_bytes(N_COLS)) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, gguf_quantize(name, w), err_msg=f"{name} {case}")


def test_signed_zero_blocks_follow_llama_cpp():
    """All-zero blocks holding -0.0: llama.cpp's loops (not gguf-py's argmax/min) decide the sign of zero scales."""
    w = np.zeros((1, 64), np.float32)
    w[0, 0] = w[0, 33] = -0.0  # block 0 starts with -0.0, block 1 with +0.0
    half = [get_format(n).quantize(w)[0].reshape(2, -1)[:, :4].copy().view(np.uint16) for n in ("q4_0", "q4_1")]
    # Q4_0: max stays C's initial +0.0 and d = +0.0 / -8 = -0.0 in both blocks
    assert half[0][:, 0].tolist() == [0x8000, 0x8000]
    # Q4_1: min and max are the block's first element; d = max - min = -0.0 - -0.0 = +0.0
    assert half[1].tolist() == [[0x0000, 0x8000], [0x0000, 0x0000]]


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_round_trip_equals_gguf_py_and_torch(name):
    fmt = get_format(name)
    w = weight_cases(name)["normal"]
    data = fmt.quantize(w)
    x = fmt.dequantize(data, N_COLS)
    np.testing.assert_array_equal(x, gguf_dequantize(name, data))
    np.testing.assert_array_equal(fmt.dequantize_torch(torch.from_numpy(data), N_COLS).numpy(), x)
    # error bounds a user relies on, relative to each row's max: half a step, plus float16 rounding of the
    # block scale (and of Q4_1/Q5_1's minimum) for the block formats
    # (Q4_0/Q5_0 clip the side opposite the largest value at 2**(bits-1) - 1: a full step there)
    step = {"f32": 0, "f16": 2**-10, "bf16": 2**-7, "q8_0": 1 / 127, "q5_1": 2 / 31, "q5_0": 2 / 16,
            "q4_1": 2 / 15, "q4_0": 2 / 8, "tq2_0": 2.0}[name]
    # (Q4_1/Q5_1: the step spans max - min, up to twice the max, and the rounded minimum adds its own error)
    bound = step / 2 + {"q4_1": 2**-9, "q5_1": 2**-9}.get(name, 2**-10 if fmt.block_size > 1 else 0)
    assert np.all(np.abs(x - w) <= bound * np.abs(w).max(axis=1, keepdims=True))
    if fmt.lossless:
        np.testing.assert_array_equal(fmt.dequantize(fmt.quantize(x), N_COLS), x)


def random_blocks(name: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for `rows` rows of N_COLS, with every float16 scale overwritten by a finite value."""
    fmt = get_format(name)
    data = rng.integers(0, 256, (rows, fmt.row_bytes(N_COLS)), dtype=np.uint8)
    blocks = data.reshape(-1, fmt.type_size)
    nb = blocks.shape[0]

    def f16(n):
        return (rng.standard_normal((nb, n)) * 0.01).astype(np.float16)

    if name in ("f32", "f16", "bf16"):
        dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.float32}[name]
        vals = (rng.standard_normal(data.size // fmt.type_size) * 3).astype(dtype)
        raw = vals.view(np.uint8) if name != "bf16" else (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return raw.reshape(data.shape).copy()
    if name == "iq1_m":  # the f16 scale is spread over the top nibbles of four uint16 words
        words = blocks[:, 48:56].copy().view(np.uint16)
        bits = f16(1).view(np.uint16)[:, 0]
        for k in range(4):
            words[:, k] = (words[:, k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
        blocks[:, 48:56] = words.view(np.uint8)
        return data
    offsets = {"q4_1": [0, 2], "q5_1": [0, 2], "tq2_0": [64], "tq1_0": [52], "mxfp4": [], "nvfp4": []}.get(name, [0])
    for o in offsets:
        blocks[:, o:o + 2] = f16(1).view(np.uint8)
    return data


@pytest.mark.parametrize("name", QUANTIZABLE + DEQUANT_ONLY)
def test_dequantize_random_blocks_equals_gguf_py(name):
    fmt = get_format(name)
    data = random_blocks(name, 3, np.random.default_rng(7))
    x = fmt.dequantize(data, N_COLS)
    assert x.shape == (3, N_COLS) and x.dtype == np.float32
    np.testing.assert_array_equal(x, gguf_dequantize(name, data))
    assert np.isfinite(x).all() and np.any(x != 0)
    np.testing.assert_array_equal(fmt.dequantize_torch(torch.from_numpy(data), N_COLS).numpy(), x)
    half = fmt.dequantize_torch(torch.from_numpy(data), N_COLS, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, torch.from_numpy(x).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("name", QUANTIZABLE + DEQUANT_ONLY)
def test_registry_geometry(name):
    fmt = get_format(name)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[fmt.ggml_type]
    assert fmt.is_native and format_for_ggml_type(fmt.ggml_type) is fmt
    assert fmt.name == fmt.ggml_type.name.lower()
    assert fmt.can_quantize == (name in QUANTIZABLE)


@pytest.mark.parametrize("name", DEQUANT_ONLY)
def test_dequant_only_refuses_to_quantize(name):
    with pytest.raises(QuantFormatError, match=f"blk.0.w.*{name}.*only be decoded"):
        get_format(name).quantize(np.ones((1, N_COLS), np.float32), tensor="blk.0.w")


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_rejected_with_tensor_name(name, bad):
    w = np.ones((3, N_COLS), np.float32)
    w[2, 300] = bad
    with pytest.raises(QuantFormatError, match="blk.3.attn.wq.*NaN or Inf"):
        get_format(name).quantize(w, tensor="blk.3.attn.wq")


@pytest.mark.parametrize("name, value", [("f16", 7e4), ("q8_0", 1e7), ("q4_0", 1e6), ("q4_1", -1e5), ("q5_0", 2e6),
                                         ("q5_1", -7e4), ("tq2_0", 1e5), ("bf16", 3.4e38)])
def test_float16_scale_overflow_rejected(name, value):
    w = np.zeros((1, N_COLS), np.float32)
    w[0, 1] = value
    with pytest.raises(QuantFormatError, match="emb.*overflows"):
        get_format(name).quantize(w, tensor="emb")


def test_shape_and_dtype_errors():
    fmt = get_format("q8_0")
    with pytest.raises(QuantFormatError, match="multiple of the block size 32"):
        fmt.quantize(np.ones((2, 48), np.float32), tensor="x")
    with pytest.raises(QuantFormatError, match="2-D"):
        fmt.quantize(np.ones(64, np.float32))
    with pytest.raises(QuantFormatError, match="float data"):
        fmt.quantize(np.ones((1, 64), np.int32))
    with pytest.raises(QuantFormatError, match=r"shape \(rows, 68\)"):
        fmt.dequantize(np.zeros((2, 70), np.uint8), 64)
    with pytest.raises(QuantFormatError, match="unknown quantization method"):
        fmt.quantize(np.ones((1, 64), np.float32), method="gptq")


@pytest.mark.parametrize("name", ["q8_0", "q4_1", "bf16"])
def test_inputs_torch_bf16_and_non_contiguous(name):
    fmt = get_format(name)
    w = torch.randn(5, N_COLS * 2, generator=torch.Generator().manual_seed(0))
    expected = fmt.quantize(w.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(fmt.quantize(w.to(torch.bfloat16)), expected)
    strided = w.numpy()[:, ::2]  # non-contiguous view
    np.testing.assert_array_equal(fmt.quantize(strided), gguf_quantize(name, np.ascontiguousarray(strided)))
    before = w.clone()
    fmt.quantize(w)
    assert torch.equal(w, before)  # the caller's tensor is left alone


def test_roundf_matches_c_roundf_near_every_half():
    """roundf_int8 (trunc(|v| + 0.49999997)) against exact float64 rounding, around every k + 0.5 below 128."""
    halves = np.arange(0, 128, dtype=np.float32) + np.float32(0.5)
    around = [halves]
    for direction in (0, 200):
        x = halves
        for _ in range(4):
            x = np.nextafter(x, np.float32(direction))
            around.append(x)
    v = np.concatenate(around + [np.array([HALF_DOWN, 0.0, 1e-30, 127.0], np.float32)])
    v = v[v < 127.5]
    v = np.concatenate([v, -v])
    expected = np.sign(v.astype(np.float64)) * np.floor(np.abs(v.astype(np.float64)) + 0.5)
    np.testing.assert_array_equal(roundf_int8(np.abs(v), np.signbit(v)), expected.astype(np.int8))


def test_bf16_nan_handling_matches_ggml():
    x = np.array([np.nan, -np.nan, 1.0, -2.5, np.inf, 3.3895314e38], np.float32)
    x[0] = np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]  # signalling NaN with low payload
    ref = gq.quantize(x.reshape(1, -1), T.BF16).view(np.uint16).ravel()
    np.testing.assert_array_equal(fp32_to_bf16_bits(x), ref)
    assert fp32_to_bf16_bits(x)[0] == 0x7FC0  # forced quiet


# ----- llama.cpp's C reference (tests/oracle.py) -----------------------------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("name", [n for n in QUANTIZABLE if n != "f32"])
def test_quantize_bytes_equal_llama_cpp(ggml, name):  # noqa: F811
    fmt = get_format(name)
    for case, w in weight_cases(name).items():
        np.testing.assert_array_equal(fmt.quantize(w), ggml.quantize(fmt.ggml_type, w), err_msg=f"{name} {case}")


@pytest.mark.oracle
@pytest.mark.parametrize("name", [n for n in QUANTIZABLE + DEQUANT_ONLY if n != "f32"])
def test_dequantize_equals_llama_cpp(ggml, name):  # noqa: F811
    fmt = get_format(name)
    data = random_blocks(name, 3, np.random.default_rng(11))
    np.testing.assert_array_equal(fmt.dequantize(data, N_COLS), ggml.dequantize(fmt.ggml_type, data, N_COLS))
