"""The one-pass dequantize kernel (prefill: decode each weight once, then cuBLAS) against the reference
`layout.dequantize_packed`, for every kernel format and layout; on CPU through triton's interpreter."""
from __future__ import annotations

import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.runtime.kernels import INT_SPECS, cat_rows, dequantize_packed  # noqa: E402
from s2conv.runtime.kernels.dequant import dequantize  # noqa: E402
from test_kernels import FORMATS, make_two_level, make_weight, packed_on_device  # noqa: E402

TWO_LEVEL = [f for f in ("q2_k", "q4_k", "q3_k") if f in INT_SPECS]


def _packed(fmt: str, n: int, k: int, two_level: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    args = make_two_level(fmt, n, k, gen) if two_level else make_weight(fmt, n, k, gen)
    return packed_on_device(fmt, args)


@pytest.mark.parametrize("fmt,two_level", [(f, False) for f in FORMATS] + [(f, True) for f in TWO_LEVEL])
@pytest.mark.parametrize("k", [256, 768])
def test_dequantize_equals_the_reference(fmt, two_level, k):
    """Every code, scale and min lands where `dequantize_packed` puts it (40 rows: a partial 16-row group;
    768 columns: a partial 512-code block of the interleaved layout). fp32 may differ from the reference only
    where the compiler fuses code * scale - min into one rounding; bf16 by at most one rounding of that."""
    p = _packed(fmt, 40, k, two_level)
    want = dequantize_packed(fmt, p, k, torch.float32)
    got = dequantize(fmt, p, k, torch.float32)
    assert got.shape == want.shape == (40, k) and got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    half = dequantize(fmt, p, k, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert float((half.float() - want).abs().max()) <= 2**-8 * float(want.abs().max())


@pytest.mark.parametrize("fmt", ["q4", "q4_k", "q8_0", "fp8"])
def test_dequantize_joined_halves(fmt):
    """A gated weight's w1 | w3 (`cat_rows`, each tensor stacked on dim 0) with halves of whole 16-row groups
    dequantizes as w1 over w3 (other halves keep row padding between them: the prefill path splits them)."""
    if fmt not in FORMATS:
        pytest.skip(f"{fmt} has no kernel here")
    k = 256
    a, b = _packed(fmt, 48, k, False, 1), _packed(fmt, 48, k, False, 2)
    got = dequantize(fmt, cat_rows(a, b), k, torch.float32)
    want = torch.cat([dequantize_packed(fmt, a, k), dequantize_packed(fmt, b, k)])
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


@pytest.mark.parametrize("fmt", ["q4", "q2_k", "q4_k", "q6_k", "q8_0", "fp8", "q8"])
@pytest.mark.parametrize("gated", [False, True])
def test_prefill_rows_take_the_dequantized_weight(fmt, gated, monkeypatch):
    """From PREFILL_M rows of bf16 x a launcher returns what QuantLinear's reference path computes (the weight
    rounded once to bf16, then x @ W^T; gated: silu(h1) * h3 as FeedForward does), and the fused kernel keeps
    the rows below it."""
    if fmt not in FORMATS:
        pytest.skip(f"{fmt} has no kernel here")
    from s2conv.runtime.kernels import GATED_KERNELS, KERNELS, dequant

    monkeypatch.setattr(dequant, "PREFILL_M", 24)
    k, n = 256, 40  # 40 rows: each half of a joined gated weight has padded row groups
    a, b = _packed(fmt, n, k, False, 3), _packed(fmt, n, k, False, 4)
    p = cat_rows(a, b) if gated else a
    w = [dequantize_packed(fmt, t, k, torch.bfloat16) for t in ((a, b) if gated else (a,))]
    x = (torch.randn(24, k, generator=torch.Generator().manual_seed(5)) * 0.1).to(torch.bfloat16).to(DEVICE)
    h = [torch.nn.functional.linear(x, wi) for wi in w]
    want = torch.nn.functional.silu(h[0]) * h[1] if gated else h[0]
    got = (GATED_KERNELS if gated else KERNELS)[fmt](x, p)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:  # the GPU may fuse code * scale - min into one rounding: a weight off by one bf16 rounding at most
        assert float((got.float() - want.float()).abs().max()) <= 2**-6 * float(want.float().abs().max())
    fused = (GATED_KERNELS if gated else KERNELS)[fmt](x[:23], p)  # one row fewer: the fused kernel
    assert float((fused.float() - want[:23].float()).abs().max()) <= 2**-5 * float(want.float().abs().max())


@pytest.mark.parametrize("fmt", ["q4", "q4_k", "q8_0"])
def test_prefill_path_refuses_a_wrong_k_or_residual(fmt, monkeypatch):
    """The prefill path checks what the fused launchers check before a kernel could read past the weight: x's
    columns against the weight's K, and the residual's shape (one-line errors)."""
    if fmt not in FORMATS:
        pytest.skip(f"{fmt} has no kernel here")
    from s2conv.errors import RuntimeModelError
    from s2conv.runtime.kernels import KERNELS, dequant

    monkeypatch.setattr(dequant, "PREFILL_M", 4)
    p = _packed(fmt, 32, 256, False)
    x = torch.randn(4, 256 + 512).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(RuntimeModelError, match=r"K \(columns of x\) must be in"):
        KERNELS[fmt](x, p)
    with pytest.raises(RuntimeModelError, match="residual must be"):
        KERNELS[fmt](x[:, :256], p, residual=torch.zeros(4, 31, dtype=torch.bfloat16, device=DEVICE))
