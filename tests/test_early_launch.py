"""Kernels that launch early inside CUDA graphs (`launch.launch_early`, PDL 3: the decode attention, the RMSNorm,
the fused sampler) give in a graph's replays what they give launched eagerly, on new inputs at every replay: the
attention requests the cached keys and values of earlier positions while the qkv GEMV before it still runs, and
must read the GEMV's output only after it is written. GPU only (CI's CPU has no PDL)."""
from __future__ import annotations

import pytest
import torch

from test_cuda_int import _cuda_row, _packed, capture

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

H, HKV, D, DIM, SPAN = 32, 8, 128, 2560, 512  # S2's slow AR


def _spy(monkeypatch) -> list:
    """The launch_pdl of every early launch (`launch_early` decides it while capturing)."""
    from s2conv.runtime.kernels import launch as launch_mod
    seen, real = [], launch_mod.launch

    def spying(kernel, grid, *args, outputs=(), **kwargs):
        if kwargs.get("PDL") == 3:
            seen.append((getattr(kernel, "__name__", str(kernel)), kwargs.get("launch_pdl", False)))
        return real(kernel, grid, *args, outputs=outputs, **kwargs)
    monkeypatch.setattr(launch_mod, "launch", spying)
    return seen


def test_a_layer_chain_with_early_attention_replays_as_eager(monkeypatch):
    """Three slow-AR-shaped layers (q4 wqkv GEMV -> attention with qk-norm, RoPE and cache write -> q4 wo GEMV with
    the residual, then the RMSNorm) captured once, replayed at five positions with new inputs and new cached keys
    and values each time: every replay equals the eager chain bit for bit, caches included."""
    from s2conv.runtime.kernels import cuda_int, fused
    from s2conv.runtime.kernels.launch import early_pdl
    from s2conv.runtime.rope import precompute_freqs_cis
    seen = _spy(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    src = _cuda_row(DIM, torch.bfloat16, gen)
    layers = [(_packed("q4", (H + 2 * HKV) * D, DIM, gen)[0], _packed("q4", DIM, H * D, gen)[0]) for _ in range(3)]
    caches = [[(torch.randn(1, HKV, SPAN, D, generator=gen) * 0.5).to(torch.bfloat16).cuda() for _ in range(2)]
              for _ in layers]
    qw = (torch.rand(D, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    kw = (torch.rand(D, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    g = (torch.rand(DIM, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    table = precompute_freqs_cis(SPAN, D, 1e6).cuda()
    pos = torch.tensor([100], device="cuda")
    freqs = table[100:101].clone()
    h0 = torch.empty_like(src)

    def chain() -> torch.Tensor:
        h0.copy_(src)
        x = h0
        for (wqkv, wo), (k_cache, v_cache) in zip(layers, caches):
            qkv = cuda_int.int_gemv(x, wqkv["qweight"], wqkv["scales"], norm_weight=g, norm_eps=1e-6)
            y = fused.rope_attention(qkv, qw, kw, freqs, k_cache, v_cache, pos, SPAN, H, HKV, 1e-6)
            x = cuda_int.int_gemv(y.view(1, H * D), wo["qweight"], wo["scales"], residual=x)
        return fused.rms_norm(x, g, 1e-6)

    chain()  # compiles every kernel before the capture
    del seen[:]  # the capture's early launches only
    graph, out = capture(chain)
    if early_pdl(src.device).get("PDL") == 3:  # Hopper: the attentions and the norm went out with PDL
        assert seen.count(("_decode_attn_kernel", True)) == 3 and seen.count(("_rms_norm_kernel", True)) == 1
    for step in range(5):
        p = 100 + 37 * step
        pos.fill_(p)
        freqs.copy_(table[p:p + 1])
        src.copy_(torch.randn(src.shape, generator=torch.Generator().manual_seed(step)).to(src.dtype))
        for k_cache, v_cache in caches:  # new older keys and values: the attention reads them before its wait
            k_cache[:, :, :p].normal_(generator=torch.Generator("cuda").manual_seed(step))
            v_cache[:, :, :p].normal_(generator=torch.Generator("cuda").manual_seed(step + 50))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone(), [(k[:, :, p].clone(), v[:, :, p].clone()) for k, v in caches]
        eager = chain()
        assert torch.equal(replayed[0], eager), step
        for (k1, v1), (k_cache, v_cache) in zip(replayed[1], caches):
            assert torch.equal(k1, k_cache[:, :, p]) and torch.equal(v1, v_cache[:, :, p])


def test_the_sampler_after_its_noise_draw_replays_as_eager(monkeypatch):
    """`sample_many` drawing its own noise right before the fused sampler (the noise's kernel is the sampler's
    predecessor, so an early sampler must wait before it reads the noise): replays equal eager draws."""
    from s2conv.runtime.kernels.sampling import topk_sample
    from s2conv.runtime.kernels.launch import early_pdl
    seen = _spy(monkeypatch)
    torch.cuda.manual_seed(0)
    logits = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    scale = torch.ones(1, 4096, dtype=torch.bfloat16, device="cuda")
    noise = torch.empty(1, 1, 30, device="cuda")
    draws = torch.tensor([[0.8, 0.9]], device="cuda")

    def chain() -> torch.Tensor:
        scaled = logits * scale  # the logits come from a kernel of the graph
        noise.exponential_()  # the default generator: graph-safe
        return topk_sample(scaled, None, None, noise, draws, 30)

    chain()  # compiles every kernel before the capture
    del seen[:]  # the capture's early launches only
    graph, out = capture(chain)
    if early_pdl(logits.device).get("PDL") == 3:
        assert seen == [("_topk_sample_kernel", True)]
    picks = set()
    for step in range(6):
        logits.copy_((torch.randn(1, 4096, generator=torch.Generator().manual_seed(step)) * 3).to(logits.dtype))
        graph.replay()
        torch.cuda.synchronize()
        token, drawn = int(out), noise.clone()
        want = topk_sample(logits * scale, None, None, drawn, draws, 30)  # eager, with the replay's noise
        assert token == int(want), step
        picks.add(token)
    assert len(picks) > 1
