"""The codec's Triton kernels against eager torch (on CPU through triton's interpreter, small shapes), and the codec
decoding on them the same audio as without them."""
from __future__ import annotations

import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.runtime.codec import Codec  # noqa: E402
from s2conv.runtime.kernels.codec_ops import snake  # noqa: E402
from test_runtime_math import TINY_CODEC, random_codec_weights  # noqa: E402


def snake_eager(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = alpha.reshape(1, -1, 1).double()
    xd = x.double()
    return (xd + torch.sin(a * xd).pow(2) / (a + 1e-9)).to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 3, 1), (2, 5, 37), (1, 4, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_snake_matches_eager(shape, dtype, strided):
    g = torch.Generator().manual_seed(0)
    b, c, n = shape
    x = (torch.randn(b, c, n + 3, generator=g) * 3).to(DEVICE, dtype)
    x = x[..., 3:] if strided else x[..., :n].contiguous()  # strided rows: a conv's trimmed output
    alpha = (torch.rand(1, c, 1, generator=g) * 2 + 0.1).to(DEVICE, dtype)
    y = snake(x, alpha)
    assert y.shape == x.shape and y.is_contiguous() and y.dtype == dtype
    want = snake_eager(x.float(), alpha.float())
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # one bf16 rounding of the result
    assert torch.allclose(y.float(), want, rtol=tol, atol=tol)
    assert (y.float() - x.float()).abs().max() > 0.1  # the activation did something


def test_snake_rejects_mismatched_alpha():
    from s2conv.errors import RuntimeModelError
    with pytest.raises(RuntimeModelError, match="alpha"):
        snake(torch.zeros(1, 3, 8, device=DEVICE), torch.ones(4, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="the codec takes its kernels on a GPU only")
def test_codec_decodes_the_same_audio_with_its_kernels(monkeypatch):
    from s2conv.runtime import codec as codec_module
    codec = Codec.from_weights(TINY_CODEC, random_codec_weights(TINY_CODEC), torch.float32, device="cuda")
    codes = torch.randint(0, 16, (2, 10, 17), generator=torch.Generator().manual_seed(0)).cuda()
    fused = codec.decode(codes)
    monkeypatch.setattr(codec_module, "_snake_kernel", lambda: None)
    eager = codec.decode(codes)
    assert torch.allclose(fused, eager, atol=1e-4)


def test_graphed_streaming_decode_equals_eager_streaming():
    """graphed=True: CUDA graphs on a GPU (the last chunk padded to a whole one), plain decoding elsewhere; the
    audio is the same either way."""
    codec = Codec.from_weights(TINY_CODEC, random_codec_weights(TINY_CODEC), torch.float32, device=DEVICE)
    codes = torch.randint(0, 16, (1, 10, 23), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    eager = list(codec.decode_streaming(codes, chunk=5, history=7))
    graphed = list(codec.decode_streaming(codes, chunk=5, history=7, graphed=True))
    assert [c.shape for c in graphed] == [c.shape for c in eager]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(graphed, eager))
    if DEVICE == "cuda":  # shapes 5, 10, 12 (history 7 reached at the third chunk), each captured once
        assert sorted(codec._graphs.graphs) == [(1, 10, 5), (1, 10, 10), (1, 10, 12)]
        again = codec.decode(codes[..., 3:15], pos_offset=3, graphed=True)  # a captured shape, another position
        assert torch.allclose(again, codec.decode(codes[..., 3:15], pos_offset=3), atol=1e-5)
