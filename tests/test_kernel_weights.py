"""Storage bytes of every kernel-backed format repack into kernel layouts that stand for exactly the same weights."""
import numpy as np
import pytest
import torch

from s2conv.quant_formats import get_format
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


def test_formats_without_a_kernel_have_no_pieces():
    fmt = get_format("q5_k")
    data = fmt.quantize(np.ones((2, 256), dtype=np.float32))
    assert kernel_pieces(fmt, torch.from_numpy(data), 256) is None
