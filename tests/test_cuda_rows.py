"""The CUDA GEMV for row-major 8-bit weights, fp8 and q8 (`kernels/cuda_rows.py`): every variant compiles for sm_90
(on the CPU, with nvcc, where it is installed), and on a GPU its outputs, norm-chain outputs included, match the
reference path and the Triton float GEMV, eager and graph-replayed with PDL."""
from __future__ import annotations

import shutil

import pytest
import torch

from s2conv.runtime.kernels.cuda_rows import Variant, max_blocks, min_blocks
from test_cuda_int import _close as close
from test_cuda_int import _cuda_row, assert_compiles_without_spills, assert_replay_matches_eager

_FLAGS = [dict(), dict(gated=True), dict(has_res=True), dict(norm=True, gated=True, zero=True),
          dict(norm=True, has_res=True, ss=True, gx=True, zero=True), dict(fp16=True, has_res=True),
          dict(gated=True, norm=True, pdl=True), dict(has_res=True, ss=True, zero=True, gx=True, pdl=True)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("warps", [1, 5, 19, "max"])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "int8"])
@pytest.mark.parametrize("flags", _FLAGS, ids=lambda f: "-".join(f) or "plain")
def test_variant_compiles_for_sm90_without_spills(tmp_path, warps, fp8, flags):
    gated = flags.get("gated", False)
    warps = min(max_blocks(gated), 24 if warps == "max" else warps)
    assert_compiles_without_spills(Variant(warps, fp8, **flags, min_blocks=min_blocks(gated, warps)).source(), tmp_path)


def _weight(fmt: str, rows: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes on the GPU, fp32 row scales, the dequantized fp32 weight)."""
    scales = torch.rand(rows, generator=gen) * 0.002 + 0.0005  # |w| ~ 0.1: gated fp16 outputs stay finite
    if fmt == "fp8":
        codes = (torch.randn(rows, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        codes = torch.randint(-127, 128, (rows, k), generator=gen, dtype=torch.int8)
    return codes.cuda(), scales.cuda(), (codes.float() * scales[:, None]).cuda()


def _row(k: int, dtype: torch.dtype, gen: torch.Generator, fmt: str) -> torch.Tensor:
    from s2conv.runtime.kernels.cuda_common import capability
    x = _cuda_row(k, dtype, gen)
    if fmt == "fp8" and capability(x.device) < 9:
        pytest.skip("fp8 e4m3 conversion needs sm_90")
    return x


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    close(a, b, tol=1e-2)


@pytest.mark.parametrize("fmt", ["fp8", "q8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(8, 512), (40, 640), (2560, 2560), (96, 9728)])
@pytest.mark.parametrize("mode", ["plain", "residual", "norm", "gated", "gated-norm"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_reference(mode, n, k, dtype, fmt):
    from s2conv.runtime.kernels.cuda_rows import rows8_gemv
    gen = torch.Generator().manual_seed(n + k)
    x = _row(k, dtype, gen, fmt)
    gated = mode.startswith("gated")
    if gated and k > max_blocks(True) * 512:
        pytest.skip("gated K beyond the kernel's limit")
    codes, scales, w = _weight(fmt, 2 * n if gated else n, k, gen)
    res = torch.randn(1, n, generator=gen).to(dtype).cuda() if mode == "residual" else None
    norm_ss, xin = None, x.float()
    if mode.endswith("norm"):
        g = (torch.rand(k, generator=gen) + 0.5).to(dtype).cuda()
        ss = x.float().pow(2).sum().reshape(1)
        norm_ss = (ss, g, 1e-6)
        xin = (x.float() * torch.rsqrt(ss / k + 1e-6)).to(dtype).float() * g.float()
    y = rows8_gemv(x, codes, scales, gated, residual=res, norm_ss=norm_ss)
    t = xin @ w.T
    want = torch.nn.functional.silu(t[:, :n]) * t[:, n:] if gated else t + (res.float() if res is not None else 0)
    assert y.shape == (1, n) and y.dtype == dtype
    _close(y, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp8", "q8"])
@pytest.mark.parametrize("gated", [False, True])
def test_norm_chain_matches_triton(monkeypatch, fmt, gated):
    """ss_out, zero, norm_ss and gx_out as `ops.float_linear_impl` documents them: the dispatcher's CUDA path
    against the Triton GEMV (forced by an explicit config) on the same inputs."""
    from s2conv.runtime.kernels import cuda_common, cuda_rows, ops
    if not cuda_common.pdl_capable(torch.device("cuda")):
        pytest.skip("the CUDA GEMV takes fp8 and q8 only where it can launch with PDL")
    calls = []
    rows8_gemv = cuda_rows.rows8_gemv
    monkeypatch.setattr(cuda_rows, "rows8_gemv", lambda *a, **kw: (calls.append(1), rows8_gemv(*a, **kw))[1])
    n, k = (2560, 2560) if not gated else (1024, 2560)
    gen = torch.Generator().manual_seed(11)
    x = _row(k, torch.bfloat16, gen, fmt)
    codes, scales, _ = _weight(fmt, 2 * n if gated else n, k, gen)
    g_in = (torch.rand(k, generator=gen) + 0.5).to(x.dtype).cuda()
    g_out = (torch.rand(n, generator=gen) + 0.5).to(x.dtype).cuda()
    res = torch.randn(1, n, generator=gen).to(x.dtype).cuda()
    cfg = ops.default_config("float", 8, n, k, 1, x.device, gated, 0)
    outs = []
    for config in (None, cfg):  # None: the CUDA GEMV; cfg: Triton
        ss_in = x.float().pow(2).sum().reshape(1)
        ss_out = torch.full((1,), 0.5, device="cuda")
        zero = torch.full((1,), 9.0, device="cuda")
        gx = torch.empty(1, n, dtype=x.dtype, device="cuda")
        chain = dict(norm_ss=(ss_in, g_in, 1e-6), zero=zero)
        if not gated:
            chain.update(ss_out=ss_out, gx_out=(g_out, gx), residual=res)
        y = ops.float_linear_impl(x, codes, scales, gated, config, **chain)
        outs.append((y, ss_out.clone(), zero.clone(), gx.clone()))
    assert calls == [1]  # the dispatcher took the CUDA GEMV once, the explicit config Triton
    (y_c, ss_c, z_c, gx_c), (y_t, ss_t, z_t, gx_t) = outs
    _close(y_c, y_t)
    assert z_c.item() == 0.0 and z_t.item() == 0.0
    if not gated:
        _close(gx_c, gx_t)
        assert ss_c.item() == pytest.approx(ss_t.item(), rel=1e-2)
        assert ss_c.item() == pytest.approx(0.5 + y_c.float().pow(2).sum().item(), rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp8", "q8"])
def test_graph_replay_with_pdl_matches_eager(monkeypatch, fmt):
    """A captured chain of GEMVs (each x the previous output, after a copy node) replays like eager launches; on
    sm_90+ every GEMV but the first (which follows the copy node) goes out with PDL."""
    from s2conv.runtime.kernels import cuda_common
    from s2conv.runtime.kernels.cuda_rows import rows8_gemv
    n = k = 2560
    gen = torch.Generator().manual_seed(5)
    src = _row(k, torch.bfloat16, gen, fmt)
    weights = [_weight(fmt, n, k, gen)[:2] for _ in range(5)]
    h0 = torch.empty_like(src)
    pdl_launches = []
    launch_pdl = cuda_common._launch_pdl
    monkeypatch.setattr(cuda_common, "_launch_pdl", lambda *a: (pdl_launches.append(1), launch_pdl(*a)))

    def chain() -> torch.Tensor:
        h0.copy_(src)
        h = h0
        for codes, scales in weights:
            h = rows8_gemv(h, codes, scales, residual=h)
        return h

    assert_replay_matches_eager(chain, src)
    if cuda_common.pdl_capable(src.device):
        assert len(pdl_launches) == len(weights) - 1


def test_aligned_refuses_a_norm_weight_the_kernel_cannot_read():
    """The input norm's weight is read 16 bytes at a time as x's 16-bit dtype: an offset view or another dtype
    stays on Triton (CPU tensors: the check reads only pointers, strides and dtypes)."""
    from s2conv.runtime.kernels import cuda_rows
    k = 2560
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    w, scales = torch.zeros(8, k, dtype=torch.int8), torch.ones(8)
    g = torch.ones(k + 8, dtype=torch.bfloat16)
    ss = torch.ones(1)
    assert cuda_rows.aligned(x, w, scales, (ss, g[:k], 1e-6))
    assert not cuda_rows.aligned(x, w, scales, (ss, g[1:k + 1], 1e-6))  # 2 bytes past a 16-byte boundary
    assert not cuda_rows.aligned(x, w, scales, (ss, g[:k].float(), 1e-6))


def test_takes_only_what_it_computes():
    """The dispatcher's gate: fp8 or int8 codes with a scale per row, no groups, one 16-bit CUDA row."""
    from s2conv.runtime.kernels import cuda_common, cuda_rows
    x = torch.zeros(1, 2560, dtype=torch.bfloat16)
    w8 = torch.zeros(16, 2560, dtype=torch.int8)
    assert not cuda_rows.takes(x, w8, True, 0, 2560, False)  # a CPU tensor
    if torch.cuda.is_available() and cuda_common.available(x.cuda()):
        xc, wc = x.cuda(), w8.cuda()
        assert cuda_rows.takes(xc, wc, True, 0, 2560, True)
        assert not cuda_rows.takes(xc, wc, False, 0, 2560, False)  # no scales
        assert not cuda_rows.takes(xc, wc, True, 32, 2560, False)  # grouped (q8_0)
        assert not cuda_rows.takes(xc, wc.bfloat16(), True, 0, 2560, False)
        assert not cuda_rows.takes(xc, wc, True, 0, 9728, True)  # gated: more loads than the registers hold
