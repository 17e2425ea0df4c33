"""The CUDA integer GEMV (`kernels/cuda_int.py`: q4, q4_0, q3, q2, tq2_0): every variant compiles for sm_90 (on the CPU, with
nvcc, where it is installed), and on a GPU its outputs, norm-chain outputs included, match the reference path and
the Triton GEMV."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from s2conv.runtime.kernels.cuda_int import Variant, max_blocks, min_blocks

_FLAGS = [dict(), dict(gated=True), dict(has_res=True), dict(norm=True), dict(gated=True, norm=True),
          dict(has_res=True, ss=True, zero=True, gx=True), dict(gated=True, rs=True),
          dict(rs=True, has_res=True, ss=True, gx=True), dict(fp16=True, has_res=True),
          dict(gated=True, norm=True, pdl=True), dict(has_res=True, ss=True, zero=True, gx=True, pdl=True),
          dict(half_scales=True), dict(gated=True, norm=True, half_scales=True)]


_CODES = {"q4": dict(bits=4, group=128, offset=8), "q4_0": dict(bits=4, group=32, offset=8),
          "q3": dict(bits=3, group=128, offset=4),
          "q2": dict(bits=2, group=64, offset=2), "tq2_0": dict(bits=2, group=256, offset=2)}


def assert_compiles_without_spills(source: str, tmp_path) -> None:
    """nvcc compiles a CUDA GEMV's kernel source for sm_90 without warnings and without register spills."""
    src = tmp_path / "k.cu"
    src.write_text(source)
    r = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-Werror", "all-warnings", str(src), "-o",
                        str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 bytes spill stores" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("warps", [1, 5, 19, "max"])
@pytest.mark.parametrize("fmt", list(_CODES))
@pytest.mark.parametrize("flags", _FLAGS, ids=lambda f: "-".join(f) or "plain")
def test_variant_compiles_for_sm90_without_spills(tmp_path, warps, fmt, flags):
    """Up to `max_blocks` warps: the registers hold a lane's words without spilling (one more warp gated spills)."""
    warps = min(max_blocks(flags.get("gated", False)), 24 if warps == "max" else warps)
    assert_compiles_without_spills(Variant(warps, **_CODES[fmt], **flags,
                                           min_blocks=min_blocks(flags.get("gated", False), warps)).source(), tmp_path)


def _cuda_row(k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    from s2conv.runtime.kernels.cuda_common import available
    x = (torch.randn(1, k, generator=gen) * 2).to(dtype).cuda()
    if not available(x):
        pytest.skip("no NVRTC, or a GPU below sm_80")
    return x


def _packed(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """(the packed weight on the GPU, its dequantized fp32 [n, k]) of random codes and scales."""
    from s2conv.runtime.kernels import INT_SPECS, REPACK, dequantize_packed
    spec = INT_SPECS[fmt]
    codes = torch.randint(spec.code_min, spec.code_max + 1, (n, k), generator=gen, dtype=torch.int8)
    packed = REPACK[fmt](codes.cuda(), (torch.rand(n, k // spec.group, generator=gen) * 0.02 + 0.001).cuda())
    return packed, dequantize_packed(fmt, packed, k)


def _rms(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float() * g.float()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1.5e-2) -> None:
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    assert err < tol, err


@pytest.mark.parametrize("fmt", list(_CODES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(16, 512), (40, 1536), (2560, 2560), (96, 4096), (32, 9728)])
@pytest.mark.parametrize("mode", ["plain", "residual", "norm", "gated", "gated-norm"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_reference(mode, n, k, dtype, fmt):
    from s2conv.runtime.kernels import cat_rows
    from s2conv.runtime.kernels.cuda_int import int_gemv
    gated = mode.startswith("gated")
    if k % _CODES[fmt]["group"] or (gated and k > max_blocks(True) * 512):
        pytest.skip("K not whole scale groups, or beyond the gated kernel's limit")
    gen = torch.Generator().manual_seed(n + k)
    x = _cuda_row(k, dtype, gen)
    p1, w1 = _packed(fmt, n, k, gen)
    if gated:
        p3, w3 = _packed(fmt, n, k, gen)
        packed = cat_rows(p1, p3)
    else:
        packed = p1
    g = (torch.rand(k, generator=gen) + 0.5).to(dtype).cuda() if mode.endswith("norm") else None
    res = torch.randn(1, n, generator=gen).to(dtype).cuda() if mode == "residual" else None
    xin = _rms(x, g, 1e-6) if g is not None else x.float()
    if gated:
        want = torch.nn.functional.silu(xin @ w1.T) * (xin @ w3.T)
    else:
        want = xin @ w1.T + (res.float() if res is not None else 0)
    c = _CODES[fmt]
    y = int_gemv(x, packed["qweight"], packed["scales"], gated, residual=res, norm_weight=g, norm_eps=1e-6,
                 offset=c["offset"], bits=c["bits"], group=c["group"])
    assert y.shape == (1, n) and y.dtype == dtype
    _close(y, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(_CODES))
@pytest.mark.parametrize("sign", [1, -1])
def test_largest_integer_dots_stay_exact(fmt, sign):
    """Every code at the end of its range farthest from 0 and every x the same +-1 (scaled to the integer range's
    end): the integer dots the kernel converts through floats reach their largest size (`exact_xmax`), and the
    output is still x W^T to bf16 rounding."""
    from s2conv.runtime.kernels import INT_SPECS, REPACK, dequantize_packed
    from s2conv.runtime.kernels.cuda_int import int_gemv
    spec, c = INT_SPECS[fmt], _CODES[fmt]
    n, k = 32, 2560
    far = spec.code_min if -spec.code_min >= spec.code_max else spec.code_max
    codes = torch.full((n, k), far, dtype=torch.int8)
    packed = REPACK[fmt](codes.cuda(), torch.full((n, k // spec.group), 0.01).cuda())
    x = torch.full_like(_cuda_row(k, torch.bfloat16, torch.Generator().manual_seed(0)), sign)  # skips w/o NVRTC
    want = x.float() @ dequantize_packed(fmt, packed, k).T
    y = int_gemv(x, packed["qweight"], packed["scales"], offset=c["offset"], bits=c["bits"], group=c["group"])
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(_CODES))
@pytest.mark.parametrize("gated", [False, True])
def test_norm_chain_matches_triton(gated, fmt):
    """ss_out, zero, gx_out and rs_in as `ops.int_linear_impl` documents them: the dispatcher's CUDA path against
    the Triton GEMV (forced by an explicit config) on the same inputs."""
    from s2conv.runtime.kernels import cat_rows, ops
    n, k = 2560 if not gated else 1024, 2560
    c = _CODES[fmt]
    gen = torch.Generator().manual_seed(7)
    x = _cuda_row(k, torch.bfloat16, gen)
    packed = cat_rows(_packed(fmt, n, k, gen)[0], _packed(fmt, n, k, gen)[0]) if gated else _packed(fmt, n, k, gen)[0]
    g = (torch.rand(n, generator=gen) + 0.5).to(x.dtype).cuda()
    res = torch.randn(1, n, generator=gen).to(x.dtype).cuda()
    cfg = ops.default_config("int", c["bits"], n, k, 1, x.device, gated, c["group"])
    outs = []
    for config in (None, cfg):  # None: the CUDA GEMV; cfg: Triton
        ss_in = torch.full((1,), 3.0 * k, device="cuda")
        ss_out = torch.full((1,), 0.5, device="cuda")
        zero = torch.full((1,), 9.0, device="cuda")
        gx = torch.empty(1, n, dtype=x.dtype, device="cuda")
        chain = dict(rs_in=(ss_in, 1e-6), zero=zero)
        if not gated:
            chain.update(ss_out=ss_out, gx_out=(g, gx), residual=res)
        y = ops.int_linear_impl(x, packed["qweight"], packed["scales"], None, c["bits"], c["offset"], c["group"],
                                gated, config, **chain)
        outs.append((y, ss_out.clone(), zero.clone(), gx.clone()))
    (y_c, ss_c, z_c, gx_c), (y_t, ss_t, z_t, gx_t) = outs
    _close(y_c, y_t)
    assert z_c.item() == 0.0 and z_t.item() == 0.0
    if not gated:
        _close(gx_c, gx_t)
        assert ss_c.item() == pytest.approx(ss_t.item(), rel=1e-2)
        assert ss_c.item() == pytest.approx(0.5 + y_c.float().pow(2).sum().item(), rel=1e-4)


def capture(chain) -> tuple:
    """(graph, its output) of chain() captured on a side stream; run chain() once before, so that every kernel is
    compiled first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        out = chain()
    torch.cuda.current_stream().wait_stream(side)
    return graph, out


def assert_replay_matches_eager(chain, src: torch.Tensor) -> None:
    """Capture chain() (a chain of launches reading src) on a side stream, then for three new inputs in src the
    graph's replay equals an eager chain() bit for bit."""
    chain()  # compiles every variant before the capture
    graph, out = capture(chain)
    for seed in range(3):
        src.copy_(torch.randn(src.shape, generator=torch.Generator().manual_seed(seed)).to(src.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.clone(), chain())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", list(_CODES))
def test_graph_replay_with_pdl_matches_eager(monkeypatch, fmt):
    """A captured chain of GEMVs (each x the previous output) after a copy node and with a torch kernel in between:
    the replay matches eager launches on new inputs. On sm_90+ the GEMVs that follow a kernel go out with PDL and
    read x only after their producer's writes; the first follows a copy node and must not."""
    from s2conv.runtime.kernels import cuda_common, cuda_int
    n = k = 2560
    gen = torch.Generator().manual_seed(3)
    src = _cuda_row(k, torch.bfloat16, gen)
    weights = [_packed(fmt, n, k, gen)[0] for _ in range(6)]
    c = _CODES[fmt]
    g = (torch.rand(k, generator=gen) + 0.5).to(src.dtype).cuda()
    h0 = torch.empty_like(src)
    pdl_launches = []
    launch_pdl = cuda_common._launch_pdl
    monkeypatch.setattr(cuda_common, "_launch_pdl", lambda *a: (pdl_launches.append(1), launch_pdl(*a)))

    def chain() -> torch.Tensor:
        h0.copy_(src)
        h = h0
        for i, p in enumerate(weights):
            h = cuda_int.int_gemv(h, p["qweight"], p["scales"], residual=h, norm_weight=g, norm_eps=1e-6,
                                  offset=c["offset"], bits=c["bits"], group=c["group"])
            if i == 2:
                h = h * 0.5
        return h

    assert_replay_matches_eager(chain, src)
    if cuda_common.pdl_capable(src.device):
        assert len(pdl_launches) == 5  # every GEMV but the first, which follows the copy node


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_call_the_cuda_gemv_cannot_take_still_gets_its_norm(monkeypatch):
    """K not a whole number of 512-code blocks: `fuses_norm` answers for the CUDA GEMV, `aligned` then sends the
    call to Triton, whose tuned config here has no dp2a path to fold the norm into: the norm runs first."""
    import dataclasses

    from s2conv.runtime.kernels import cuda_int, ops
    n, k = 40, 640
    gen = torch.Generator().manual_seed(17)
    x = _cuda_row(k, torch.bfloat16, gen)
    packed, w = _packed("q3", n, k, gen)
    g = (torch.rand(k, generator=gen) + 0.5).to(x.dtype).cuda()
    assert ops.fuses_norm(x, 3, 4, 128, False, k)
    assert not cuda_int.aligned(x, packed["qweight"], packed["scales"], 128)
    plain = dataclasses.replace(ops.default_config("int", 3, n, k, 1, x.device, False, 128), int_dot=False)
    monkeypatch.setitem(ops.TUNED, ops._int_key(x, packed["scales"], 3, 128, False, False), plain)
    y = ops.int_linear_impl(x, packed["qweight"], packed["scales"], None, 3, 4, 128, False, norm_weight=g,
                            norm_eps=1e-6)
    _close(y, _rms(x, g, 1e-6) @ w.T)


def test_aligned_refuses_a_norm_weight_the_kernel_cannot_read():
    """The folded norm's weight is read 16 bytes at a time as x's 16-bit dtype: an offset view or another dtype
    stays on Triton (CPU tensors: the check reads only shapes, pointers, strides and dtypes)."""
    from s2conv.runtime.kernels import cuda_int
    k = 2560
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    qweight, scales = torch.zeros(16, k // 8, dtype=torch.int32), torch.ones(16, k // 128)
    g = torch.ones(k + 8, dtype=torch.bfloat16)
    assert cuda_int.aligned(x, qweight, scales, 128, g[:k])
    assert not cuda_int.aligned(x, qweight, scales, 128, g[1:k + 1])  # 2 bytes past a 16-byte boundary
    assert not cuda_int.aligned(x, qweight, scales, 128, g[:k].float())


def test_takes_only_what_it_computes():
    """The dispatcher's gate: 4-bit codes in groups of 32 or 128, 2- and 3-bit ones in groups of 64, 128 or 256, no mins, K up
    to the limit, one 16-bit CUDA row."""
    from s2conv.runtime.kernels import cuda_common, cuda_int
    x = torch.zeros(1, 2560, dtype=torch.bfloat16)
    assert not cuda_int.takes(x, 4, 128, False, 2560, False)  # a CPU tensor
    if torch.cuda.is_available() and cuda_common.available(x.cuda()):
        xc = x.cuda()
        assert cuda_int.takes(xc, 4, 128, False, 2560, True)
        for bits in (2, 3):
            assert cuda_int.takes(xc, bits, 128, False, 2560, False)
            assert cuda_int.takes(xc, bits, 256, False, 2560, True)
            assert cuda_int.takes(xc, bits, 64, False, 2560, False)
            assert not cuda_int.takes(xc, bits, 32, False, 2560, False)
        assert cuda_int.takes(xc, 4, 32, False, 2560, False) and not cuda_int.takes(xc, 4, 256, False, 2560, False)
        assert not cuda_int.takes(xc, 8, 128, False, 2560, False)
        assert not cuda_int.takes(xc, 4, 128, True, 2560, False)
        assert cuda_int.takes(xc, 4, 128, False, 9728, False) == (cuda_int.max_k(xc.device) >= 9728)
        assert not cuda_int.takes(xc, 4, 128, False, 9728, True)  # gated: more words than the registers hold
        assert not cuda_int.takes(torch.zeros(2, 2560, dtype=torch.bfloat16, device="cuda"), 4, 128, False, 2560,
                                  False)
