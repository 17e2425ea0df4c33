"""The CUDA GEMV on the fragment layout (`kernels/cuda_frag.py`: q4_k's, q3_k's and q2_k's one row): every variant
compiles for sm_90 (on the CPU, with nvcc, where it is installed), and on a GPU the dispatcher's CUDA path matches
the reference weight and the tensor-core kernel, norm chain and graph replay included."""
from __future__ import annotations

import shutil

import pytest
import torch

from s2conv.runtime.kernels.cuda_frag import Variant
from s2conv.runtime.kernels.cuda_int import max_blocks, min_blocks
from test_cuda_int import assert_compiles_without_spills

_FLAGS = [dict(), dict(gated=True), dict(has_res=True), dict(has_res=True, ss=True, zero=True, gx=True),
          dict(gated=True, rs=True), dict(rs=True, has_res=True, ss=True, gx=True), dict(fp16=True, has_res=True),
          dict(gated=True, rs=True, zero=True, pdl=True), dict(has_res=True, ss=True, zero=True, gx=True, pdl=True)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("warps", [1, 5, 19, "max"])
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16), (2, 16)])
@pytest.mark.parametrize("flags", _FLAGS, ids=lambda f: "-".join(f) or "plain")
def test_variant_compiles_for_sm90_without_spills(tmp_path, warps, bits, group, flags):
    warps = min(max_blocks(flags.get("gated", False)), 24 if warps == "max" else warps)
    assert_compiles_without_spills(Variant(warps, bits, group, **flags,
                                           min_blocks=min_blocks(flags.get("gated", False), warps)).source(), tmp_path)


_BITS = {"q4_k": (4, 32), "q3_k": (3, 16), "q2_k": (2, 16)}


def _kq(fmt: str, n: int, k: int, gen: torch.Generator):
    """(two-level repack arguments, the packed weight on the GPU) of random codes and scales of a K-quant."""
    from test_kernels import make_two_level

    from s2conv.runtime.kernels import REPACK
    args = make_two_level(fmt, n, k, gen)
    return args, {name: t.cuda() for name, t in REPACK[fmt](*args).items()}


def _row(k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    from s2conv.runtime.kernels.cuda_common import available
    x = (torch.randn(1, k, generator=gen) * 2).to(dtype).cuda()
    if not available(x):
        pytest.skip("no NVRTC, or a GPU below sm_80")
    return x


def _linear(fmt, x, p, gated, config=None, **kw):
    from s2conv.runtime.kernels import ops
    bits, group = _BITS[fmt]
    return ops.int_linear_impl(x, p["qweight"], p["scales"], p["mins"], bits, 0, group, gated, config, **kw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(16, 512), (40, 1536), (2560, 2560), (96, 4096), (32, 9728)])
@pytest.mark.parametrize("mode", ["plain", "residual", "gated"])
@pytest.mark.parametrize("fmt", list(_BITS))
def test_matches_reference(fmt, dtype, n, k, mode, monkeypatch):
    """The CUDA path (counted) within one output rounding of x W^T from the repack arguments."""
    from test_kernels import assert_matches, reference_weight

    from s2conv.runtime.kernels import cat_rows, cuda_frag
    gated = mode == "gated"
    if gated and (k > max_blocks(True) * 512 or cuda_frag.shared_bytes(k // 512, _BITS[fmt][0], True)
                  > cuda_frag.SHARED_MAX):
        pytest.skip("beyond the gated kernel's limit")
    calls = []
    gemv = cuda_frag.frag_gemv
    monkeypatch.setattr(cuda_frag, "frag_gemv", lambda *a, **kw: (calls.append(1), gemv(*a, **kw))[1])
    gen = torch.Generator().manual_seed(n + k)
    x = _row(k, dtype, gen)
    a1, p1 = _kq(fmt, n, k, gen)
    if gated:
        a3, p3 = _kq(fmt, n, k, gen)
        p = cat_rows(p1, p3)
    else:
        p = p1
    res = torch.randn(1, n, generator=gen).to(dtype).cuda() if mode == "residual" else None
    y = _linear(fmt, x, p, gated, residual=res)
    assert calls == [1]
    h1 = x.float().cpu() @ reference_weight(fmt, a1, k).T
    if gated:
        ref = torch.nn.functional.silu(h1) * (x.float().cpu() @ reference_weight(fmt, a3, k).T)
        assert_matches(y, ref, dtype, 2e-3 * ref.abs().max())
    elif res is not None:
        ref = h1.to(dtype).float() + res.float().cpu()
        assert_matches(y, ref, dtype, 2e-3 * h1.abs().max() + 1e-2 * h1.abs())
    else:
        assert_matches(y, h1, dtype, 2e-3 * h1.abs().max())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("fmt", list(_BITS))
def test_norm_chain_matches_the_tensor_core_kernel(fmt, gated):
    """ss_out, zero, gx_out and rs_in through the CUDA path against the tensor-core kernel (an explicit config)."""
    from s2conv.runtime.kernels import cat_rows, ops
    n, k = (2560 if not gated else 1024), 2560
    gen = torch.Generator().manual_seed(11)
    x = _row(k, torch.bfloat16, gen)
    p = cat_rows(_kq(fmt, n, k, gen)[1], _kq(fmt, n, k, gen)[1]) if gated else _kq(fmt, n, k, gen)[1]
    g = (torch.rand(n, generator=gen) + 0.5).to(x.dtype).cuda()
    res = torch.randn(1, n, generator=gen).to(x.dtype).cuda()
    outs = []
    for config in (None, ops.Config(block_n=16, split=2, num_warps=1)):
        ss_in = torch.full((1,), 3.0 * k, device="cuda")
        ss_out = torch.full((1,), 0.5, device="cuda")
        zero = torch.full((1,), 9.0, device="cuda")
        gx = torch.empty(1, n, dtype=x.dtype, device="cuda")
        chain = dict(rs_in=(ss_in, 1e-6), zero=zero)
        if not gated:
            chain.update(ss_out=ss_out, gx_out=(g, gx), residual=res)
        y = _linear(fmt, x, p, gated, config, **chain)
        outs.append((y, ss_out.clone(), zero.clone(), gx.clone()))
    (y_c, ss_c, z_c, gx_c), (y_t, ss_t, z_t, gx_t) = outs

    def close(a, b):  # element by element: two bf16 roundings, and x's integer rounding against the largest output
        a, b = a.float(), b.float()
        bad = (a - b).abs() > 2 * 2.0**-8 * b.abs() + 2e-3 * b.abs().max()
        assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outputs off"
    close(y_c, y_t)
    assert z_c.item() == 0.0 and z_t.item() == 0.0
    if not gated:
        close(gx_c, gx_t)
        assert ss_c.item() == pytest.approx(ss_t.item(), rel=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(_BITS))
def test_graph_replay_with_pdl_matches_eager(fmt):
    """A captured chain of GEMVs after a copy node, each x the previous output: the replay matches eager launches
    on new inputs (the first GEMV follows the copy node and goes out plainly, the others with PDL on sm_90+)."""
    from test_cuda_int import assert_replay_matches_eager
    n = k = 2560
    gen = torch.Generator().manual_seed(5)
    src = _row(k, torch.bfloat16, gen)
    weights = [_kq(fmt, n, k, gen)[1] for _ in range(4)]
    h0 = torch.empty_like(src)

    def chain() -> torch.Tensor:
        h0.copy_(src)
        h = h0
        for p in weights:
            h = _linear(fmt, h, p, False, residual=h)
        return h

    assert_replay_matches_eager(chain, src)


def test_takes_only_what_it_computes():
    """Two-level scales: q4_k's (4-bit 32-code groups, 8 a super-block), q3_k's (3-bit 16-code groups, 16
    a super-block) and q2_k's (2-bit 16-code groups, 16 a super-block); K a whole number of 512-code pieces within
    the register limit; one CUDA row."""
    from s2conv.runtime.kernels import cuda_common, cuda_frag
    x = torch.zeros(1, 2560, dtype=torch.bfloat16)
    assert not cuda_frag.takes(x, 4, 32, 8, 2560, False)  # a CPU tensor
    if torch.cuda.is_available() and cuda_common.available(x.cuda()):
        xc = x.cuda()
        assert cuda_frag.takes(xc, 4, 32, 8, 2560, False) and cuda_frag.takes(xc, 4, 32, 8, 9728, False)
        assert not cuda_frag.takes(xc, 4, 32, 0, 2560, False)  # fp32 scales and mins (q4_1)
        assert cuda_frag.takes(xc, 2, 16, 16, 2560, False) and cuda_frag.takes(xc, 3, 16, 16, 2560, False)
        assert not cuda_frag.takes(xc, 2, 16, 8, 2560, False) and not cuda_frag.takes(xc, 3, 16, 8, 2560, False)
        assert not cuda_frag.takes(xc, 4, 16, 16, 2560, False)  # 4-bit codes in 16-code groups: no such path
        assert not cuda_frag.takes(xc, 4, 32, 8, 2304, False)  # not whole 512-code pieces
        assert not cuda_frag.takes(xc, 4, 32, 8, 9728, True)  # gated: more words than the registers hold
        # scales through shared memory: q2_k and q3_k fit 48 KB up to S2's K = 9728 (gated 6144), q4_k further
        assert cuda_frag.takes(xc, 2, 16, 16, 9728, False) and not cuda_frag.takes(xc, 2, 16, 16, 10240, False)
        assert cuda_frag.takes(xc, 3, 16, 16, 6144, True) and not cuda_frag.takes(xc, 3, 16, 16, 6656, True)
        assert cuda_frag.takes(xc, 4, 32, 8, 12288, False)
