"""QuantLinear keeps one copy of its weight: after `prepare_kernel` the storage bytes are freed and every path
(kernel, reference, fused w1|w3, reload) reads the kernel layout, with the same numbers as before (CPU: the kernels
run in triton's interpreter, small shapes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.errors import RuntimeModelError  # noqa: E402
from s2conv.quant_formats import get_format  # noqa: E402
from s2conv.runtime import fused_decode  # noqa: E402
from s2conv.runtime.kernel_weights import kernel_pieces  # noqa: E402
from s2conv.runtime.kernels import KERNELS, REPACK  # noqa: E402
from s2conv.runtime.qlinear import QuantLinear  # noqa: E402


KERNEL_FORMATS = ["q8", "q4", "q3", "q2", "q8_0", "q4_0", "q4_k", "q6_k", "q3_k", "q2_k", "fp8"]


def storage_bytes(fmt_name: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(n, k)) * 0.02).astype(np.float32)
    w[:, 3] *= 20  # an outlier column
    return torch.from_numpy(get_format(fmt_name).quantize(w)).to(DEVICE)


def quant_linear(fmt_name: str, n: int = 20, k: int = 512, seed: int = 0) -> QuantLinear:
    """n = 20: the integer layout pads the rows to 32 (two groups of 16), so the padding is exercised."""
    m = QuantLinear(get_format(fmt_name), k, n, device=DEVICE)
    m.load_state_dict({"weight": storage_bytes(fmt_name, n, k, seed)})
    return m


def x_rows(k: int, m: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("name", KERNEL_FORMATS)
def test_prepare_kernel_frees_the_storage_bytes_and_keeps_the_weight(name):
    m = quant_linear(name)
    x = x_rows(m.in_features)
    old = m.weight
    old_ptr, old_bytes = old.untyped_storage().data_ptr(), old.numel()
    before = {dtype: m.dequantized(dtype) for dtype in (torch.float32, torch.bfloat16)}
    y_ref = m(x)
    # what the kernel computed before this change: the launcher on a repack of the (then still resident) bytes
    y_old_kernel = KERNELS[name](x, REPACK[name](*kernel_pieces(m.fmt, old, m.in_features)))
    del old

    assert m.prepare_kernel(force=True)
    assert m.storage_released and m.weight.numel() == 0 and m.weight.shape == (20, 0)
    assert m.weight.dtype == torch.uint8 and m.weight.device == x.device
    packed = m.kernel[1]
    assert all(t.untyped_storage().data_ptr() != old_ptr for t in packed.values())  # no view of the freed bytes
    assert m.resident_bytes() == sum(t.numel() * t.element_size() for t in packed.values())
    assert 0 < old_bytes <= m.resident_bytes()  # only the kernel layout is left (its K and rows are padded)

    for dtype, want in before.items():  # the kernel layout is lossless: the same weight, bit for bit
        assert torch.equal(m.dequantized(dtype), want), dtype
    y = m(x)  # kernel path
    assert torch.equal(y, y_old_kernel)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-5 * float(y_ref.abs().max()))
    m._kernel_on_cpu = False  # CPU inputs now take the reference path, decoding the kernel layout
    if DEVICE == "cpu":
        assert torch.equal(m(x), y_ref)


def test_prepare_kernel_twice_keeps_the_kernel_and_a_lost_weight_is_a_clear_error():
    m = quant_linear("q4")
    assert m.prepare_kernel(force=True)
    kernel = m.kernel
    assert m.prepare_kernel(force=True) and m.prepare_kernel()
    assert m.kernel is kernel
    m.kernel = None  # storage released and the kernel dropped: no weight left anywhere
    with pytest.raises(RuntimeModelError, match="storage bytes released"):
        m.prepare_kernel(force=True)
    with pytest.raises(RuntimeModelError, match="storage bytes released"):
        m(x_rows(m.in_features))


def test_the_kernel_moves_with_the_module_and_keeps_its_dtypes():
    """model.to(device) after prepare_kernel: the kernel layout (the only copy of W) goes along; .double() or
    .half() convert no kernel tensor (int32 codes, fp32 scales)."""
    m = quant_linear("q4_k")
    m.prepare_kernel(force=True)
    dtypes = {name: t.dtype for name, t in m.kernel[1].items()}
    w = m.dequantized(torch.float32)
    m.double().half()
    assert {name: t.dtype for name, t in m.kernel[1].items()} == dtypes
    if DEVICE == "cuda":  # a real round trip through host memory
        m.cpu()
        assert all(t.device.type == "cpu" for t in m.kernel[1].values())
        m.to(DEVICE)
    assert all(t.device.type == DEVICE for t in m.kernel[1].values())
    assert torch.equal(m.dequantized(torch.float32), w)
    m.to("meta")  # any device: no tensor of the kernel stays behind
    assert all(t.device.type == "meta" for t in m.kernel[1].values()) and m.weight.device.type == "meta"


def test_new_storage_bytes_assigned_after_prepare_are_repacked():
    m = quant_linear("q4")
    m.prepare_kernel(force=True)
    other = storage_bytes("q4", 20, 512, seed=5)
    m.weight = other.clone()  # what a caller swapping weights by hand does; prepare_kernel repacks them
    assert m.prepare_kernel(force=True) and m.storage_released
    ref = QuantLinear(get_format("q4"), 512, 20, device=DEVICE)
    ref.load_state_dict({"weight": other})
    assert torch.equal(m.dequantized(torch.float32), ref.dequantized(torch.float32))


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU behaviour: no kernel without force")
def test_no_kernel_keeps_the_storage_bytes():
    m = quant_linear("q4")
    assert not m.prepare_kernel()  # CPU weight, not forced
    assert m.kernel is None and m.weight.shape == m.storage_shape
    # a format without a kernel (iq4_nl: codes index a table), even when forced: blocks of fp16 d + 16 code bytes
    blocks = np.random.default_rng(0).integers(0, 256, (4, 8, 18), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    iq = QuantLinear(get_format("iq4_nl"), 256, 4, device=DEVICE)
    iq.load_state_dict({"weight": torch.from_numpy(blocks.reshape(4, -1)).to(DEVICE)})
    want = iq(x_rows(256))
    assert not iq.prepare_kernel(force=True)
    assert iq.kernel is None and iq.weight.shape == iq.storage_shape
    assert torch.equal(iq(x_rows(256)), want)


def test_state_dict_after_release_and_reloading_the_storage_bytes():
    m = quant_linear("q8_0")
    data = m.weight.clone()
    want = m.dequantized(torch.float32)
    m.prepare_kernel(force=True)
    assert m.state_dict()["weight"].shape == (20, 0)  # the keys stay; the bytes are gone
    for assign in (False, True):
        m.load_state_dict({"weight": data}, assign=assign)  # the released buffer takes the full bytes back
        assert m.kernel is None and torch.equal(m.weight, data)
        assert torch.equal(m.dequantized(torch.float32), want)
        assert m.prepare_kernel(force=True) and m.storage_released
        assert torch.equal(m.dequantized(torch.float32), want)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a released state dict cannot pass for a weight
        QuantLinear(get_format("q8_0"), 512, 20, device=DEVICE).load_state_dict(m.state_dict())


class FeedForward(nn.Module):
    def __init__(self, fmt: str, dim: int = 512, hidden: int = 24, seed: int = 0):
        super().__init__()
        self.w1, self.w3 = quant_linear(fmt, hidden, dim, seed), quant_linear(fmt, hidden, dim, seed + 1)
        self.w2 = nn.Linear(hidden, dim, bias=False).to(DEVICE)


@pytest.mark.parametrize("name", ["q4", "q4_k"])
def test_joined_w13_of_released_quant_linears_and_rejoin_after_a_reload(name):
    ff = FeedForward(name)
    x = x_rows(512, m=1)
    d1, d3 = ff.w1.dequantized(torch.float32), ff.w3.dequantized(torch.float32)
    assert ff.w1.prepare_kernel(force=True) and ff.w3.prepare_kernel(force=True)
    gated, joined = fused_decode._w13(ff)
    # w1 and w3 now read views of the joined tensors: still one copy, and still the same weights
    assert ff.w1.kernel[1]["qweight"].data_ptr() == joined["qweight"].data_ptr()
    assert torch.equal(ff.w1.dequantized(torch.float32), d1) and torch.equal(ff.w3.dequantized(torch.float32), d3)
    want = F.silu(x @ d1.T) * (x @ d3.T)
    assert torch.allclose(gated(x, joined), want, rtol=0, atol=1e-5 * float(want.abs().max()))

    # reload new storage bytes into w1 and w3 (e.g. load_weights on the same model), then prepare again
    new1, new3 = storage_bytes(name, 24, 512, seed=7), storage_bytes(name, 24, 512, seed=8)
    ff.w1.load_state_dict({"weight": new1})
    ff.w3.load_state_dict({"weight": new3})
    assert fused_decode._w13(ff) is None  # no kernels until prepared: w1 and w3 are called one after the other
    assert ff.w1.prepare_kernel(force=True) and ff.w3.prepare_kernel(force=True)
    gated, joined2 = fused_decode._w13(ff)
    assert joined2["qweight"].data_ptr() != joined["qweight"].data_ptr()
    e1, e3 = ff.w1.dequantized(torch.float32), ff.w3.dequantized(torch.float32)
    assert not torch.equal(e1, d1)
    want = F.silu(x @ e1.T) * (x @ e3.T)
    assert torch.allclose(gated(x, joined2), want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_kernel_frees_gpu_memory():
    m = QuantLinear(get_format("q4"), 4096, 4096, device="cuda")
    m.load_state_dict({"weight": storage_bytes("q4", 4096, 4096)})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert m.prepare_kernel()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    storage = 4096 * get_format("q4").row_bytes(4096)
    # the packed tensors arrived (~ the storage size) and the storage bytes left
    assert abs(grown - (m.resident_bytes() - storage)) < 1 << 20
