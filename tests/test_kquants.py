"""The ggml K-quants (Q2_K ... Q6_K): bytes and decoding against llama.cpp (oracle) and gguf-py, errors, inputs."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import ggml  # noqa: F401  (pytest fixture)

from s2conv.errors import QuantFormatError
from s2conv.quant_formats import format_for_ggml_type, get_format
from s2conv.quant_formats._kquant import dot0, sum0

KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
GGML_TYPES = {"q2_k": GGMLQuantizationType.Q2_K, "q3_k": GGMLQuantizationType.Q3_K, "q4_k": GGMLQuantizationType.Q4_K,
              "q5_k": GGMLQuantizationType.Q5_K, "q6_k": GGMLQuantizationType.Q6_K}
# Relative MSE (mse / mean(w^2)) on Gaussian weights: what each type achieves with llama.cpp's quantizer, plus margin.
GAUSS_REL_MSE = {"q2_k": 0.14, "q3_k": 0.045, "q4_k": 0.011, "q5_k": 0.003, "q6_k": 0.0009}


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Student-t (df 3) weights scaled ~0.02 with a few outlier columns, like LLM linear layers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (rows, cols)) * 0.02
    w[:, rng.choice(cols, 3, replace=False)] *= 25
    return w.astype(np.float32)


def make_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    const = np.ones((3, 512), np.float32) * np.array([[0.5], [-0.25], [7.0]], np.float32)
    mixed = np.zeros((3, 256), np.float32)
    mixed[0, :16] = 1.0  # one non-zero sub-block, the rest zero
    mixed[1, ::2] = -3.0  # two values only
    mixed[2, 100] = 1e-3  # a single spike
    return {
        "heavy_16x1024": heavy_tailed(16, 1024),
        "heavy_1x256": heavy_tailed(1, 256, seed=2),
        "heavy_3x768": heavy_tailed(3, 768, seed=3),
        "heavy_17x512": heavy_tailed(17, 512, seed=4),
        "zeros": np.zeros((3, 512), np.float32),
        "constant_rows": const,
        "sparse_patterns": mixed,
        "tiny_1e-8": (rng.standard_normal((17, 256)) * 1e-8).astype(np.float32),
        "large_1e4": (rng.standard_normal((3, 512)) * 1e4).astype(np.float32),
        "subnormal_1e-39": (rng.standard_normal((2, 256)) * 1e-39).astype(np.float32),  # scales overflow to inf
    }


CASES = make_cases()


@pytest.mark.parametrize("n_cols", [8, 16, 512, 8192])
def test_sums_run_in_c_order(n_cols):
    """Bit-exactness rests on numpy summing (n, N) arrays over axis 0 in index order, products left to right."""
    rng = np.random.default_rng(n_cols)
    a, b, c = ((rng.standard_t(3, (32, n_cols)) * 10.0 ** rng.integers(-6, 4, (32, 1))).astype(np.float32)
               for _ in "abc")
    s_a, s_ab, s_abc = (np.zeros(n_cols, np.float32) for _ in range(3))
    for i in range(32):
        s_a, s_ab, s_abc = s_a + a[i], s_ab + a[i] * b[i], s_abc + a[i] * b[i] * c[i]
    np.testing.assert_array_equal(sum0(a), s_a)
    np.testing.assert_array_equal(dot0(a, b), s_ab)
    np.testing.assert_array_equal(dot0(a, b, c), s_abc)


@pytest.mark.parametrize("name", KQUANTS)
def test_registry_geometry(name):
    fmt = get_format(name)
    assert fmt.ggml_type == GGML_TYPES[name]
    assert fmt.block_size == 256
    assert fmt.type_size == GGML_QUANT_SIZES[fmt.ggml_type][1]
    assert fmt.is_native and format_for_ggml_type(fmt.ggml_type) is fmt
    assert fmt.row_bytes(2560) == 10 * fmt.type_size


@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dequantize_matches_gguf_py_and_torch(name, case):
    fmt, w = get_format(name), CASES[case]
    data = fmt.quantize(w)
    assert data.shape == (w.shape[0], fmt.row_bytes(w.shape[1])) and data.dtype == np.uint8
    ours = fmt.dequantize(data, w.shape[1])
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(data, fmt.ggml_type))
    np.testing.assert_array_equal(fmt.dequantize_torch(torch.from_numpy(data), w.shape[1]).numpy(), ours)


@pytest.mark.parametrize("name", KQUANTS)
def test_dequantize_torch_dtype(name):
    fmt, w = get_format(name), CASES["heavy_3x768"]
    data = torch.from_numpy(fmt.quantize(w))
    out = fmt.dequantize_torch(data, w.shape[1], dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(fmt.dequantize(data.numpy(), w.shape[1])).to(torch.bfloat16))


@pytest.mark.parametrize("name", KQUANTS)
def test_error_on_gaussian(name):
    """Without the oracle too: the reconstruction error is what the type is known to reach."""
    w = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    fmt = get_format(name)
    rel = float(((fmt.dequantize(fmt.quantize(w), 1024) - w) ** 2).mean() / (w ** 2).mean())
    assert rel < GAUSS_REL_MSE[name]


@pytest.mark.parametrize("name", KQUANTS)
def test_zero_sub_blocks_decode_to_zero(name):
    """All-zero sub-blocks, alone or beside non-zero ones, come back as exact zeros."""
    fmt = get_format(name)
    w = np.zeros((2, 256), np.float32)
    w[1, :32] = np.linspace(-1, 1, 32)  # one sub-block of 32 (Q4_K, Q5_K) or two of 16
    out = fmt.dequantize(fmt.quantize(w), 256)
    assert not out[0].any() and not out[1, 32:].any()
    assert np.abs(out[1, :32] - w[1, :32]).max() < 0.75


@pytest.mark.oracle
@pytest.mark.parametrize("name", KQUANTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_llama_cpp(ggml, name, case):  # noqa: F811
    fmt, w = get_format(name), CASES[case]
    ours = fmt.quantize(w)
    ref = ggml.quantize(fmt.ggml_type, w)
    n_cols = w.shape[1]
    # decoding: ours == llama.cpp's C dequantizer == gguf-py, on both byte streams
    for data in (ours, ref):
        c_out = ggml.dequantize(fmt.ggml_type, data, n_cols)
        np.testing.assert_array_equal(fmt.dequantize(data, n_cols), c_out)
        np.testing.assert_array_equal(gguf.quants.dequantize(data, fmt.ggml_type), c_out)
    # error: never worse than llama.cpp's reference quantizer
    mse_ours = float(((ggml.dequantize(fmt.ggml_type, ours, n_cols) - w) ** 2).mean())
    mse_ref = float(((ggml.dequantize(fmt.ggml_type, ref, n_cols) - w) ** 2).mean())
    assert mse_ours <= mse_ref * 1.0005 + 1e-30
    # and in fact the same bytes (the reference algorithm, float32 operation order included)
    diff_blocks = np.flatnonzero((ours.reshape(-1, fmt.type_size) != ref.reshape(-1, fmt.type_size)).any(axis=1))
    assert diff_blocks.size == 0, f"{diff_blocks.size} super-blocks differ from llama.cpp, first {diff_blocks[:5]}"


@pytest.mark.oracle
@pytest.mark.parametrize("name", KQUANTS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3), scale_exp=st.integers(-40, 3),
       levels=st.sampled_from([0, 2, 5]))
def test_matches_llama_cpp_random(ggml, name, seed, rows, scale_exp, levels):  # noqa: F811
    """Random scales and value sets (levels > 0: few distinct values, so ties and flat sub-blocks happen)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (rows, 256)) * 10.0 ** scale_exp
    if levels:
        w = rng.choice(np.unique(w.ravel())[:levels], size=w.shape)
    w = w.astype(np.float32)
    fmt = get_format(name)
    np.testing.assert_array_equal(fmt.quantize(w), ggml.quantize(fmt.ggml_type, w))


@pytest.mark.parametrize("name", KQUANTS)
def test_rejects_bad_input(name):
    fmt = get_format(name)
    w = heavy_tailed(2, 512)
    w[1, 7] = np.nan
    with pytest.raises(QuantFormatError, match="blk.0.attn_q.weight.*NaN/Inf"):
        fmt.quantize(w, tensor="blk.0.attn_q.weight")
    w[1, 7] = np.inf
    with pytest.raises(QuantFormatError, match="layer.x"):
        fmt.quantize(w, tensor="layer.x")
    with pytest.raises(QuantFormatError, match="big.w: max \\|value\\| 1e\\+05 exceeds 65504"):
        fmt.quantize(np.full((1, 256), -1e5, np.float32), tensor="big.w")
    with pytest.raises(QuantFormatError, match="not a multiple of the block size 256"):
        fmt.quantize(np.zeros((2, 320), np.float32), tensor="t")
    with pytest.raises(QuantFormatError, match="2-D"):
        fmt.quantize(np.zeros(512, np.float32))
    with pytest.raises(QuantFormatError, match="method"):
        fmt.quantize(np.zeros((1, 256), np.float32), method="gptq")
    with pytest.raises(QuantFormatError, match="bytes"):
        fmt.dequantize(np.zeros((1, fmt.type_size + 1), np.uint8), 256)


def test_torch_input_and_rtn_alias():
    fmt = get_format("q4_k")
    w = heavy_tailed(2, 256)
    ref = fmt.quantize(w)
    np.testing.assert_array_equal(fmt.quantize(torch.from_numpy(w).to(torch.bfloat16).float()),
                                  fmt.quantize(torch.from_numpy(w).to(torch.bfloat16).float().numpy()))
    np.testing.assert_array_equal(fmt.quantize(w, method="rtn"), ref)
