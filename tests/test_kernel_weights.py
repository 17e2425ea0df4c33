"""Storage bytes of every kernel-backed format repack into kernel layouts that stand for exactly the same weights."""
import numpy as np
import pytest
import torch

from s2conv.quant_formats import get_format
from s2conv.quant_formats.base import two_level_scales
from s2conv.runtime.kernel_weights import kernel_pieces
from s2conv.runtime.kernels.layout import REPACK, dequantize_packed


@pytest.mark.parametrize("name", sorted(REPACK.keys() - {"bf16"}))
@pytest.mark.parametrize("shape", [(3, 512), (17, 1024)])
def test_repacked_kernel_weights_decode_exactly_like_the_file(name, shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
    w[:, 5] *= 20  # an outlier column
    fmt = get_format(name)
    data = fmt.quantize(w)
    pieces = kernel_pieces(fmt, torch.from_numpy(data), shape[1])
    got = dequantize_packed(name, REPACK[name](*pieces), shape[1])
    assert torch.equal(got, torch.from_numpy(fmt.dequantize(data, shape[1])))


@pytest.mark.parametrize("name", ["iq4_nl", "f16"])
def test_formats_without_a_kernel_have_no_pieces(name):
    """Lookup-table codes (iq4_nl) and plain floats have no integer codes: those weights keep the reference path."""
    fmt = get_format(name)
    data = np.zeros((2, fmt.row_bytes(256)), dtype=np.uint8)
    assert fmt.integer_codes_torch(torch.from_numpy(data), 256) is None
    assert kernel_pieces(fmt, torch.from_numpy(data), 256) is None


@pytest.mark.parametrize("name", [n for n in sorted(REPACK) if get_format(n).code_group])
def test_integer_codes_of_ggml_types_rebuild_their_weights(name):
    """codes * scales - mins per code_group columns is exactly the format's own dequantization."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
    fmt = get_format(name)
    data = fmt.quantize(w)
    got = fmt.integer_codes_torch(torch.from_numpy(data), 512)
    g = fmt.code_group
    assert got.group == g and got.codes.shape == (4, 512) and got.scales.shape == (4, 512 // g)
    rebuilt = got.codes.float() * got.scales.repeat_interleave(g, dim=1)
    if got.mins is not None:
        rebuilt = rebuilt - got.mins.repeat_interleave(g, dim=1)
    assert torch.equal(rebuilt, torch.from_numpy(fmt.dequantize(data, 512)))
    # K-quants with mins (and q3_k) also give their scales as the file keeps them: bytes under (d, dmin) per 256
    # columns
    if name in ("q2_k", "q3_k", "q4_k", "q5_k"):
        sub, sup = got.two_level
        assert sub.dtype == torch.int16 and sub.shape == (4, 512 // g) and sup.shape == (4, 2, 2)
        scales, mins = two_level_scales(sub, sup)
        assert torch.equal(scales, got.scales) and torch.equal(mins, got.mins)
        assert kernel_pieces(fmt, torch.from_numpy(data), 512)[1].dtype == torch.int16
    else:
        assert got.two_level is None
