"""Fused decode kernels vs the eager ops of layers.py / rope.py, and whole greedy decodes with the swap on and off
(on CPU through triton's interpreter, small shapes)."""
from __future__ import annotations

import math
import pytest
import torch
import torch.nn.functional as F

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.runtime import fused_decode  # noqa: E402
from s2conv.runtime.dual_ar import DualARTransformer  # noqa: E402
from s2conv.runtime.frame_loop import generate_frames  # noqa: E402
from s2conv.runtime.kernels import fused  # noqa: E402
from s2conv.runtime.kernels.launch import counters  # noqa: E402
from s2conv.runtime.layers import HeadRMSNorm, KVCache, RMSNorm, causal_mask  # noqa: E402
from s2conv.runtime.rope import apply_rotary_emb, precompute_freqs_cis  # noqa: E402
from s2conv.runtime.sampling import SamplingParams  # noqa: E402
from test_runtime_math import TINY, _force_eos_at, random_prompt, random_s2_weights  # noqa: E402


DTYPES = [torch.float32, torch.bfloat16]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(params=["per query head", "per KV head"])
def attention_kernel(request, monkeypatch):
    """Both decode attention kernels: a program per query head, or per KV head for all its query heads (taken by
    bf16 / fp16 with 2+ query heads a KV head; other cases run the first either way)."""
    monkeypatch.setattr(fused, "ATTN_GQA_SPAN", 1 << 30 if request.param == "per query head" else 0)
    return request.param


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """bf16: within one ulp (one rounding of a summation-order difference); fp32: within 1e-6 of the largest
    magnitude (summation order and fused multiply-adds show in fp32's last bits, also after cancellation)."""
    got, want = got.detach(), want.detach()
    if got.dtype == torch.bfloat16:
        return ulps(got, want) <= 1
    return float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """Largest distance in units of the last place of `want`'s dtype (bf16: 2^-7 relative, fp16: 2^-10)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype in (torch.bfloat16, torch.float16):
        g, w = got.view(torch.int16).int(), want.view(torch.int16).int()
    else:
        g, w = got.view(torch.int32).long(), want.view(torch.int32).long()
    same_sign = (g >= 0) == (w >= 0)
    assert bool(same_sign[(got != 0) & (want != 0)].all())
    return int((g - w).abs().max())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- rms norm -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [128, 200])
def test_rms_norm_matches_fish_rounding(dtype, n):
    x = (torch.randn(3, 1, n, generator=gen()) * 4).to(dtype).to(DEVICE)
    norm = RMSNorm(n, 1e-6).to(DEVICE)
    norm.weight.data = (1 + 0.3 * torch.randn(n, generator=gen(1))).to(dtype).to(DEVICE)
    want = norm(x)
    got = fused.rms_norm(x, norm.weight, norm.eps)
    assert close(got, want)
    assert float((got != want).float().mean()) < 0.02 or dtype == torch.float32  # bf16: mostly bit-exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_rounded_sum_and_its_norm(dtype):
    n = 256
    x = torch.randn(2, 1, n, generator=gen()).to(dtype).to(DEVICE)
    r = torch.randn(2, 1, n, generator=gen(2)).to(dtype).to(DEVICE)
    norm = RMSNorm(n, 1e-6).to(DEVICE)
    norm.weight.data = (1 + 0.3 * torch.randn(n, generator=gen(1))).to(dtype).to(DEVICE)
    h, y = fused.add_rms_norm(x, r, norm.weight, norm.eps)
    assert torch.equal(h, x + r)
    assert close(y, norm(x + r))


# ---- qk norm + rope + cache ---------------------------------------------------------------------------------------
def eager_qkv_step(qkv, n_head, n_kv, d, freqs_row, q_norm, k_norm):
    """layers.Attention's split / norm / rope for one position: q, k, v each [B, heads, 1, D]."""
    b = qkv.shape[0]
    q, k, v = qkv.split([n_head * d, n_kv * d, n_kv * d], dim=-1)
    q, k, v = q.view(b, 1, n_head, d), k.view(b, 1, n_kv, d), v.view(b, 1, n_kv, d)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rotary_emb(q, freqs_row), apply_rotary_emb(k, freqs_row)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("pos", [0, 5, 13])
def test_qk_norm_rope_cache(dtype, qk_norm, pos):
    b, n_head, n_kv, d, max_seq = 2, 4, 2, 32, 16
    qkv = (torch.randn(b, 1, (n_head + 2 * n_kv) * d, generator=gen()) * 3).to(dtype).to(DEVICE)
    table = precompute_freqs_cis(max_seq, d, 10000.0).to(DEVICE)
    norms = None, None
    if qk_norm:
        norms = HeadRMSNorm(d, 1e-6).to(DEVICE), HeadRMSNorm(d, 1e-6).to(DEVICE)
        for i, m in enumerate(norms):
            m.weight.data = (1 + 0.3 * torch.randn(d, generator=gen(5 + i))).to(dtype).to(DEVICE)
    cache = KVCache(b, n_kv, max_seq, d, dtype, DEVICE)
    sentinel = torch.randn(cache.k_cache.shape, generator=gen(9)).to(dtype).to(DEVICE)
    cache.k_cache.copy_(sentinel)
    cache.v_cache.copy_(-sentinel)
    pos_t = torch.tensor([pos], device=DEVICE)
    q_want, k_want, v_want = eager_qkv_step(qkv, n_head, n_kv, d, table[pos_t], *norms)
    q = fused.qk_norm_rope_cache(qkv, norms[0].weight if qk_norm else None, norms[1].weight if qk_norm else None,
                                 table[pos_t], cache.k_cache, cache.v_cache, pos_t, n_head, n_kv, 1e-6)
    assert q.shape == (b, n_head, 1, d)
    assert close(q, q_want) and close(cache.k_cache[:, :, pos:pos + 1], k_want)
    assert torch.equal(cache.v_cache[:, :, pos:pos + 1], v_want)
    others = torch.arange(max_seq, device=DEVICE) != pos  # every other slot untouched
    assert torch.equal(cache.k_cache[:, :, others], sentinel[:, :, others])
    assert torch.equal(cache.v_cache[:, :, others], -sentinel[:, :, others])
    if qk_norm and dtype == torch.float32:  # the weights matter: q_norm on q, k_norm on k (not swapped)
        swapped = fused.qk_norm_rope_cache(qkv, norms[1].weight, norms[0].weight, table[pos_t], cache.k_cache,
                                           cache.v_cache, pos_t, n_head, n_kv, 1e-6)
        assert (swapped - q_want).abs().max() > 1e-2


# ---- attention ----------------------------------------------------------------------------------------------------
def eager_attention(q, k_cache, v_cache, pos, span, explicit, mask=None):
    """The eager attention of one position, K/V repeated per query head; mask [.., 1, span] (default: causal)."""
    n_rep = q.shape[1] // k_cache.shape[1]
    if mask is None:
        mask = causal_mask(torch.tensor([pos], device=q.device), span)
    k = k_cache[:, :, :span].repeat_interleave(n_rep, dim=1)
    v = v_cache[:, :, :span].repeat_interleave(n_rep, dim=1)
    if explicit:  # the fast AR's hand-written softmax in the model dtype
        s = (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))).masked_fill(~mask, float("-inf"))
        y = torch.softmax(s, dim=-1) @ v
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2).reshape(q.shape[0], 1, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv,pos,span", [(2, 0, 8), (1, 40, 64), (4, 100, 256), (2, 255, 300)])
def test_decode_attention_matches_masked_sdpa(dtype, n_kv, pos, span, attention_kernel):
    b, n_head, d, max_seq = 2, 4, 32, 320
    g = gen(3)
    q = torch.randn(b, n_head, 1, d, generator=g).to(dtype).to(DEVICE)
    k_cache = torch.randn(b, n_kv, max_seq, d, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(b, n_kv, max_seq, d, generator=g).to(dtype).to(DEVICE)
    k_cache[:, :, pos + 1:] = 1e4  # garbage past pos must not leak through the mask
    got = fused.decode_attention(q, k_cache, v_cache, torch.tensor([pos], device=DEVICE), span)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for explicit in (False, True):
        want = eager_attention(q, k_cache, v_cache, pos, span, explicit)
        assert got.shape == want.shape and got.dtype == dtype
        assert float((got.float() - want.float()).abs().max()) < tol * max(1.0, float(want.abs().max()))


def test_attention_splits_cover_the_span_and_fill_the_gpu():
    for span in (8, 64, 256, 512, 4096, 32768):
        n, per = fused.attention_splits(span, 32, torch.device("cpu"))
        assert per % fused.ATTN_BLOCK_N == 0 and (n - 1) * per < span <= n * per
        assert n * 32 >= min(3 * 132, -(-span // fused.ATTN_BLOCK_N) * 32)  # ~4 programs per SM


@pytest.mark.parametrize("merge", ["in the launch", "launch"])
def test_decode_attention_split_path_with_many_splits(merge, monkeypatch):
    """The splits merged by each head's last program (default) or by a reduction launch (S2CONV_ATTN_MERGE):
    at pos 0 with a long span every split but the first is empty and must contribute nothing (no NaN); at a
    late pos the result equals the masked softmax, and the arrival counters are left at zero for the next launch."""
    monkeypatch.setenv("S2CONV_ATTN_MERGE", merge)
    q = torch.randn(1, 2, 1, 16, generator=gen(4)).to(DEVICE)
    kc = torch.randn(1, 1, 1024, 16, generator=gen(5)).to(DEVICE)
    vc = torch.randn(1, 1, 1024, 16, generator=gen(6)).to(DEVICE)
    assert fused.attention_splits(1024, 2, torch.device("cpu"))[0] > 1
    got = fused.decode_attention(q, kc, vc, 0, 1024)
    assert torch.allclose(got, vc[:, :, 0].reshape(1, 1, 16).repeat(1, 1, 2), atol=1e-6)
    got = fused.decode_attention(q, kc, vc, 700, 1024)
    s = (q[0, :, 0] @ kc[0, 0, :701].T) / 4.0  # [2 heads, 701 keys]
    want = (torch.softmax(s.float(), -1) @ vc[0, 0, :701].float()).reshape(1, 1, 32)
    assert torch.allclose(got.float(), want, atol=1e-5, rtol=1e-4)
    assert not bool(counters(got.device, 2)[:2].any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_splits,splits", [(16, 16), (4, 4), (1, 1)])
def test_kv_head_programs_merge_many_splits(monkeypatch, max_splits, splits, dtype):
    """The per-KV-head kernel (bf16 or fp16, 4 query heads a KV head) over 16 key splits of one 64-key step, 4 of four
    steps, or one program per KV head walking all 16 steps: at pos 0 every split but the first is empty and
    contributes nothing; late in the span the result is the masked softmax of each head, and the arrival counters
    are left at zero."""
    monkeypatch.setattr(fused, "ATTN_GQA_SPAN", 0)
    monkeypatch.setattr(fused, "ATTN_GQA_MAX_SPLITS", max_splits)
    b, n_head, n_kv, d, span = 1, 8, 2, 32, 1024
    g = gen(21)
    q = torch.randn(b, n_head, 1, d, generator=g).to(dtype).to(DEVICE)
    kc = torch.randn(b, n_kv, span, d, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(b, n_kv, span, d, generator=g).to(dtype).to(DEVICE)
    assert fused.attention_splits(span, b * n_kv, torch.device("cpu"), 64, fused.ATTN_GQA_PER_SM,
                                  max_splits)[0] == splits
    got = fused.decode_attention(q, kc, vc, 0, span)
    assert torch.equal(got, vc[:, :, :1].repeat_interleave(4, dim=1).reshape(1, 1, n_head * d))
    got = fused.decode_attention(q, kc, vc, 900, span)
    k = kc[0, :, :901].float().repeat_interleave(4, dim=0)  # [heads, keys, d]
    s = (q[0, :, 0].float()[:, None, :] * k).sum(-1) / math.sqrt(d)
    want = (torch.softmax(s, -1)[:, :, None] * vc[0, :, :901].float().repeat_interleave(4, dim=0)).sum(1)
    assert ulps(got, want.reshape(1, 1, -1).to(dtype)) <= 1
    assert not bool(counters(got.device, b * n_kv)[: b * n_kv].any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm,n_kv,pos,span", [(True, 2, 0, 8), (False, 1, 5, 16), (True, 2, 77, 256),
                                                   (True, 4, 250, 256)])  # one split / 4 splits (pos early, late)
def test_rope_attention_equals_the_two_kernel_path(dtype, qk_norm, n_kv, pos, span, attention_kernel):
    """qk-norm + RoPE + cache write inside the attention launch: the same caches and the same output as
    `qk_norm_rope_cache` then `decode_attention` (fp32: summation order; bf16: one rounding). Row 1 is left-padded
    (offset min(pos + 1, 3): at pos 0 a padded query, which reads key pos alone)."""
    b, n_head, d, max_seq = 2, 4, 32, 256
    assert fused.attention_splits(256, b * n_head, torch.device("cpu"))[0] == 4
    g = gen(11)
    qkv = (torch.randn(b, 1, (n_head + 2 * n_kv) * d, generator=g) * 3).to(dtype).to(DEVICE)
    table = precompute_freqs_cis(max_seq, d, 10000.0).to(DEVICE)
    w = [(1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(DEVICE) for _ in range(2)] if qk_norm else [None] * 2
    caches = [KVCache(b, n_kv, max_seq, d, dtype, DEVICE) for _ in range(2)]
    filler = torch.randn(caches[0].k_cache.shape, generator=g).to(dtype).to(DEVICE)
    for c in caches:
        c.k_cache.copy_(filler)
        c.v_cache.copy_(-filler)
    pos_t = torch.tensor([pos], device=DEVICE)
    offsets = torch.tensor([0, min(pos + 1, 3)], device=DEVICE)
    q = fused.qk_norm_rope_cache(qkv, w[0], w[1], table[pos_t], caches[0].k_cache, caches[0].v_cache, pos_t, n_head,
                                 n_kv, 1e-6)
    want = fused.decode_attention(q, caches[0].k_cache, caches[0].v_cache, pos_t, span, offsets=offsets)
    got = fused.rope_attention(qkv, w[0], w[1], table[pos_t], caches[1].k_cache, caches[1].v_cache, pos_t, span,
                               n_head, n_kv, 1e-6, offsets=offsets)
    # fp32 on a GPU: the two kernels' compilations may contract the rotation into FMAs differently (last-bit)
    assert close(caches[1].k_cache, caches[0].k_cache) and torch.equal(caches[1].v_cache, caches[0].v_cache)
    assert got.shape == want.shape == (b, 1, n_head * d) and got.dtype == dtype
    assert close(got, want)


def test_cache_writes_stay_inside_the_caches():
    """H + 2 Hkv = 12 heads: the last head tile of `qk_norm_rope_cache` is partly padding, whose value-head
    arithmetic once wrote zeros past the v cache (into the next row's heads). Caches are views of one buffer here,
    followed by a guard that must stay untouched; so must every slot but pos."""
    b, n_head, n_kv, d, max_seq, pos = 2, 4, 4, 32, 16, 5
    qkv = torch.randn(b, 1, (n_head + 2 * n_kv) * d, generator=gen(12)).to(DEVICE)
    table = precompute_freqs_cis(max_seq, d, 10000.0).to(DEVICE)
    pos_t = torch.tensor([pos], device=DEVICE)
    for step in ("two kernels", "rope_attention"):
        buf = torch.full((4, b, n_kv, max_seq, d), 7.0, device=DEVICE)
        kc, vc = buf[0], buf[1]
        if step == "two kernels":
            q = fused.qk_norm_rope_cache(qkv, None, None, table[pos_t], kc, vc, pos_t, n_head, n_kv)
            fused.decode_attention(q, kc, vc, pos_t, max_seq)
        else:
            fused.rope_attention(qkv, None, None, table[pos_t], kc, vc, pos_t, max_seq, n_head, n_kv)
        assert bool((buf[2:] == 7).all()), step
        others = torch.arange(max_seq, device=DEVICE) != pos
        assert bool((buf[:2, :, :, others] == 7).all()) and not bool((buf[:2, :, :, pos] == 7).any()), step


# ---- silu * mul ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_halves_of_one_tensor(dtype):
    y = (torch.randn(1, 1, 2 * 300, generator=gen()) * 3).to(dtype).to(DEVICE)
    a, b = y.split(300, dim=-1)
    assert close(fused.silu_mul(a, b), F.silu(a) * b)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_prefill_block_equals_the_eager_block(dtype):
    """A prompt through a swapped block (`prefill_block`: the QK-norms, RoPE and cache writes of all positions in
    one launch) gives the eager block's output and caches, positions starting past 0 (a second chunk)."""
    from s2conv.runtime.layers import TransformerBlock

    g = gen(31)
    dim, n_head, n_kv, d, s, start = 64, 4, 2, 16, 12, 5
    blocks = []
    for _ in range(2):
        torch.manual_seed(0)
        blk = TransformerBlock(dim, n_head, n_kv, d, 96, 1e-6, qk_norm=True).to(dtype).to(DEVICE)
        for m in (blk.attention_norm, blk.ffn_norm, blk.attention.q_norm, blk.attention.k_norm):
            m.weight.data = (1 + 0.3 * torch.randn(m.weight.shape, generator=gen(7))).to(dtype).to(DEVICE)
        blk.attention.kv_cache = KVCache(1, n_kv, 32, d, dtype, DEVICE)
        filler = torch.randn(blk.attention.kv_cache.k_cache.shape, generator=gen(8)).to(dtype).to(DEVICE)
        blk.attention.kv_cache.k_cache.copy_(filler)
        blk.attention.kv_cache.v_cache.copy_(-filler)
        blocks.append(blk)
    pos = torch.arange(start, start + s, device=DEVICE)
    freqs = precompute_freqs_cis(32, d, 10000.0).to(DEVICE)[pos]
    mask = causal_mask(pos, start + s)
    x = torch.randn(1, s, dim, generator=g).to(dtype).to(DEVICE)
    want = blocks[0](x, freqs, mask, pos)
    assert fused_decode.enable(blocks[1], force=True)
    assert fused_decode._prompt_fuses(blocks[1], x, freqs, mask, pos)
    got = fused_decode.prefill_block(blocks[1], x, freqs, mask, pos)
    ca, cb = blocks[0].attention.kv_cache, blocks[1].attention.kv_cache
    # the norm kernel rounds as eager does; its sums (and so wqkv's input) may differ in the last bit of fp32
    assert close(cb.k_cache, ca.k_cache) and close(cb.v_cache, ca.v_cache)
    if dtype == torch.bfloat16:
        assert ulps(got, want) <= 2
    else:
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


# ---- whole model --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights():
    return random_s2_weights(TINY)


def test_greedy_decode_with_fused_kernels_equals_eager(weights, monkeypatch):
    prompt = random_prompt(TINY, 8).to(DEVICE)
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device=DEVICE)
    _force_eos_at(model, -1)
    want = generate_frames(model, prompt, 3, GREEDY, use_graphs=False)
    assert fused_decode.enable(model, force=True)
    calls, attention = [], []
    model.layers[0].attention.wqkv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    original, prompt_rows = fused.rope_attention, []
    monkeypatch.setattr(fused, "rope_attention", lambda *a, **kw: attention.append(1) or original(*a, **kw))
    original_prompt = fused.qk_norm_rope_cache_prompt
    monkeypatch.setattr(fused, "qk_norm_rope_cache_prompt",
                        lambda qkv, *a, **kw: prompt_rows.append(qkv.shape[0]) or original_prompt(qkv, *a, **kw))
    got = generate_frames(model, prompt, 3, GREEDY, use_graphs=False)
    assert calls[0] == 8 and calls[1:] == [1] * 2  # prefill (S = 8), then every decode step is S = 1
    assert prompt_rows == [8] * TINY.n_layer  # the prefill's QK-norms, RoPE and cache writes: one launch a block
    # batch 1: one attention launch with the qk-norm/RoPE per block and step (slow: 2 steps; fast: 10 per frame)
    # (the fast AR's last layer at position 0 only fills its cache: no attention launch there)
    assert len(attention) == 2 * TINY.n_layer + 3 * (TINY.num_codebooks * TINY.n_fast_layer - 1)
    assert "forward" in model.norm.__dict__ and "forward" in model.layers[0].attention_norm.__dict__  # prefill too
    assert "forward" not in model.layers[0].attention.q_norm.__dict__  # QK-norms round otherwise: eager in prefill
    assert got.shape == want.shape == (10, 3)
    assert torch.equal(got, want)
    fused_decode.disable(model)
    assert "forward" not in model.layers[0].__dict__
    assert torch.equal(generate_frames(model, prompt, 3, GREEDY, use_graphs=False), want)


def test_bf16_decode_frame_with_fused_kernels_is_close_to_eager(weights):
    """bf16 greedy codes of a random tiny model hinge on exact logit ties (8-bit mantissas), and the eager softmax
    paths round at backend-specific points, so the bf16 check is teacher-forced: the same inputs through both
    paths give the slow hidden state, the semantic logits and every fast step's logits within bf16 tolerance."""
    prompt = random_prompt(TINY, 8).to(DEVICE)
    eager, fast = (DualARTransformer.from_weights(TINY, weights, torch.bfloat16, device=DEVICE) for _ in range(2))
    assert fused_decode.enable(fast, force=True)
    # the heads at one row: the Triton GEMV (the semantic head from its joined rows), checked below with the rest
    assert "forward" in fast.fast_output.__dict__ and "semantic_logits" in fast.__dict__
    n_sem = TINY.semantic_end_id - TINY.semantic_begin_id + 1
    assert tuple(fast.__dict__["_semantic_head"].shape) == (n_sem + 1, TINY.dim)
    for m in (eager, fast):
        m.setup_caches(1, 16)
        m.prefill(prompt[None])

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    column, pos = prompt[None, :, -1:], torch.tensor([8], device=DEVICE)
    for step in range(2):  # two positions: the second attends to a key the fused path wrote
        (he, le), (hf, lf) = eager.decode_slow(column, pos + step, 16), fast.decode_slow(column, pos + step, 16)
        assert rel(hf, he) < 2**-5 and rel(lf, le) < 2**-5
    x = he[:, None]
    for p in range(TINY.num_codebooks):
        oe, of = eager.fast_step(x, p), fast.fast_step(x, p)
        ye, yf = eager.fast_logits(oe[:, 0]), fast.fast_logits(of[:, 0])
        assert rel(of, oe) < 2**-5 and rel(yf, ye) < 2**-5
        x = eager.fast_embeddings(ye.argmax(-1))[:, None]
    with torch.no_grad():  # new embedding weights after enable: the joined head rows follow them
        fast.embeddings.weight.mul_(-1)
    assert rel(fast.semantic_logits(hf), type(fast).semantic_logits(fast, hf)) < 2**-5
    fused_decode.disable(fast)
    assert "semantic_logits" not in fast.__dict__ and "forward" not in fast.fast_output.__dict__


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("which", ["slow", "fast"])
def test_fill_cache_writes_what_a_full_block_step_writes(weights, kernels, which):
    """`fill_cache` (used for the fast AR's last layer at depth 0, whose output only the discarded logits read)
    stores the keys and values that the block's full forward stores at that position, eagerly and through
    the kernels (norm, wqkv, qk-norm/RoPE/cache), with QK-norm (slow layer) and without (fast layer)."""
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device=DEVICE)
    if kernels:
        assert fused_decode.enable(model, force=True)
    model.setup_caches(1, 16)
    block = model.layers[0] if which == "slow" else model.fast_layers[-1]
    table = model.freqs_cis if which == "slow" else model.fast_freqs_cis
    cache = block.attention.kv_cache
    x = torch.randn(1, 1, TINY.dim, generator=gen(4)).to(DEVICE)
    for pos in (0, 3):
        input_pos = torch.tensor([pos], device=DEVICE)
        freqs = table[pos: pos + 1]
        written = []
        for full in (True, False):
            cache.k_cache.zero_()
            cache.v_cache.zero_()
            if full:
                block(x, freqs, causal_mask(input_pos, 8), input_pos)
            else:
                assert block.fill_cache(x, freqs, input_pos) is None
            written.append((cache.k_cache.clone(), cache.v_cache.clone()))
        (k_full, v_full), (k_fill, v_fill) = written
        assert bool(k_full[:, :, pos].abs().gt(0).all()) and bool(v_full[:, :, pos].abs().gt(0).any())
        # the same keys (on a GPU two kernels may contract the RoPE products into FMAs differently: fp32 ulps);
        # values are copied unchanged by both kernels
        assert close(k_fill, k_full) and torch.equal(v_fill, v_full)


def test_fused_block_step_matches_eager_block(weights):
    # one slow decode step layer by layer: the hidden state agrees to fp32 summation order
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device=DEVICE)
    model.setup_caches(1, 16)
    prompt = random_prompt(TINY, 8).to(DEVICE)
    model.prefill(prompt[None])
    step = prompt[None, :, -1:]
    pos = torch.tensor([8], device=DEVICE)
    want, _ = model.decode_slow(step, pos, 16)
    fused_decode.enable(model, force=True)
    got, _ = model.decode_slow(step, pos, 16)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def _quantized_tiny(weights, fmt: str) -> DualARTransformer:
    """The tiny bf16 model with every linear in `fmt`, its kernels prepared (on the CPU too: the interpreter)."""
    from s2conv.bench import quantize_model
    from s2conv.runtime.qlinear import QuantLinear

    m = DualARTransformer.from_weights(TINY, weights, torch.bfloat16, device=DEVICE)
    quantize_model(m, fmt, "all")
    for q in m.modules():
        if isinstance(q, QuantLinear):
            assert q.prepare_kernel(force=True)
    return m


def _count_norm_launches(monkeypatch) -> list:
    """A list that gets one entry per RMSNorm kernel launch (plain or with the residual add) from now on."""
    norms = []
    for name in ("rms_norm", "add_rms_norm"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _f=original, **kw: norms.append(1) or _f(*a, **kw))
    return norms

def _slow_step(eager, fast, monkeypatch) -> tuple:
    """Both models prefilled with one prompt, then one slow decode step each: ((he, le), (hf, lf), the number of
    RMSNorm launches during the steps)."""
    norms = _count_norm_launches(monkeypatch)
    prompt = random_prompt(TINY, 8).to(DEVICE)
    for m in (eager, fast):
        m.setup_caches(1, 16)
        m.prefill(prompt[None])
    norms.clear()
    pos = torch.tensor([8], device=DEVICE)
    (he, le), (hf, lf) = (m.decode_slow(prompt[None, :, -1:], pos, 16) for m in (eager, fast))
    return (he, le), (hf, lf), len(norms)



@pytest.mark.slow  # ~1 minute in triton's interpreter (CPU); seconds on a GPU
@pytest.mark.parametrize("fmt", ["q4", "q8", "q8_0", "q5_1"])
def test_quantized_block_step_folds_the_norms(weights, fmt, monkeypatch):
    """A slow decode step of a quantized bf16 model with S2CONV_FOLD_NORM=1: with q4 (dp2a GEMV) both RMSNorms of
    every block fold into the next GEMV (no norm launch left in the blocks), with q8, q8_0 and q5_1 (float GEMV,
    row-major codes: no folding) the norms chain through the GEMVs (`test_norms_chain_through_float_gemvs`); either
    way the hidden state and logits match the eager quantized model's within bf16 tolerance."""
    monkeypatch.setenv("S2CONV_FOLD_NORM", "1")  # opt-in (ops.default_config)

    eager, fast = _quantized_tiny(weights, fmt), _quantized_tiny(weights, fmt)
    assert fused_decode.enable(fast, force=True)
    (he, le), (hf, lf), n_norms = _slow_step(eager, fast, monkeypatch)
    block_norms = n_norms - 1  # the model's final norm is one more launch
    # q8 (float GEMV) chains its norms instead: only the first block's attention norm is a launch
    assert block_norms == (0 if fmt == "q4" else 1)
    assert float((hf.float() - he.float()).abs().max()) < 2**-5 * float(he.float().abs().max())
    assert float((lf.float() - le.float()).abs().max()) < 2**-5 * float(le.float().abs().max())


def test_norms_chain_through_float_gemvs(weights, monkeypatch):
    """bf16 weights at one row (the float GEMVs): a block's RMSNorms run inside the GEMVs that read their output,
    from sums of squares the producing GEMVs leave in the block's slots, so the only norm launches of a step are
    the first block's attention norm and the final norm, per stack. The slots are reset by the kernels that follow
    their readers (the fast AR's depth-0 `fill_cache` by a reset of its own), and the results match eager bf16."""
    eager, fast = (DualARTransformer.from_weights(TINY, weights, torch.bfloat16, device=DEVICE) for _ in range(2))
    assert fused_decode.enable(fast, force=True)
    (he, le), (hf, lf), n_norms = _slow_step(eager, fast, monkeypatch)
    assert n_norms == 2  # the first block's attention norm and the final norm
    slots = [t for b in (*fast.layers, *fast.fast_layers) for t in (b._ss_in, b._ss_mid)]
    assert all(float(t) == 0.0 for t in slots)  # every slot read has been reset
    rel = float((hf.float() - he.float()).abs().max() / he.float().abs().max())
    assert rel < 2**-5 and float((lf.float() - le.float()).abs().max()) < 2**-5 * float(le.float().abs().max())
    x = he[:, None]
    for m in (eager, fast):  # depth 0 as decoding runs it: the last fast layer only fills its cache
        assert m.fast_step(x, 0, output=False) is None
    assert all(float(t) == 0.0 for t in slots)  # fill_cache read the last layer's slot and reset it
    close_caches = [torch.allclose(a.attention.kv_cache.k_cache.float(), b.attention.kv_cache.k_cache.float(),
                                   atol=2**-5) for a, b in zip(eager.fast_layers, fast.fast_layers)]
    assert all(close_caches)
    for p in range(2):  # then whole steps, as the later depths run them
        oe, of = eager.fast_step(x, p), fast.fast_step(x, p)
        assert float((of.float() - oe.float()).abs().max()) < 2**-5 * float(oe.float().abs().max())
        assert all(float(t) == 0.0 for t in slots)
        x = eager.fast_embeddings(eager.fast_logits(oe[:, 0]).argmax(-1))[:, None]
    fused_decode.disable(fast)
    assert "_ss_in" not in fast.layers[0].__dict__ and "_next_block" not in fast.layers[0].__dict__


@pytest.mark.slow  # about a minute each in triton's interpreter (CPU); seconds on a GPU
@pytest.mark.parametrize("fmt", ["q4", "q4_1"])
def test_norms_chain_through_integer_gemvs(weights, fmt, monkeypatch):
    """Integer GEMVs at one row (q4: the interleaved layout, q4_1: the fragment layout, with mins): wo and w2 also
    store their output times the next RMSNorm's weight, and w1|w3 and the next block's wqkv read that copy and scale their outputs by the rsqrt of
    the sum of squares, so a step launches no norm inside the stacks but each first block's attention norm (none
    where its wqkv folds it: q4 on the CUDA GEMV) and the final norm. Slots are reset as in the float chain; the
    results match the eager quantized model's."""
    eager, fast = _quantized_tiny(weights, fmt), _quantized_tiny(weights, fmt)
    assert fused_decode.enable(fast, force=True)
    (he, le), (hf, lf), n_norms = _slow_step(eager, fast, monkeypatch)
    wqkv = fast.layers[0].attention.wqkv
    first_folds = fused_decode._folds_norm(wqkv, torch.zeros(1, 1, wqkv.in_features, dtype=he.dtype, device=DEVICE))
    assert n_norms == (1 if first_folds else 2)  # the first block's attention norm and the final norm
    slots = [t for b in (*fast.layers, *fast.fast_layers) for t in (b._ss_in, b._ss_mid)]
    assert all(float(t) == 0.0 for t in slots)
    assert float((hf.float() - he.float()).abs().max()) < 2**-5 * float(he.float().abs().max())
    assert float((lf.float() - le.float()).abs().max()) < 2**-5 * float(le.float().abs().max())
    x = he[:, None]
    for m in (eager, fast):  # depth 0: the last fast layer only fills its cache (reading the chain's slots)
        assert m.fast_step(x, 0, output=False) is None
    assert all(float(t) == 0.0 for t in slots)
    oe, of = eager.fast_step(x, 1), fast.fast_step(x, 1)
    assert float((of.float() - oe.float()).abs().max()) < 2**-5 * float(oe.float().abs().max())
    assert all(float(t) == 0.0 for t in slots)


def test_enable_is_a_no_op_on_a_cpu_model_without_force(weights):
    model = DualARTransformer.from_weights(TINY, weights, torch.float32)
    w1 = model.layers[0].feed_forward.w1.weight
    if DEVICE == "cpu":
        assert not fused_decode.enable(model)
        assert "forward" not in model.layers[0].__dict__
        assert model.layers[0].feed_forward.w1.weight is w1


def test_joined_w13_shares_storage_with_w1_and_w3(weights):
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device=DEVICE)
    ff = model.layers[1].feed_forward
    w1, w3 = ff.w1.weight.clone(), ff.w3.weight.clone()
    fused_decode.enable(model, force=True)
    joined = ff._fused_w13[1]
    assert torch.equal(joined, torch.cat([w1, w3]))
    assert ff.w1.weight.data_ptr() == joined.data_ptr()
    assert torch.equal(ff.w1.weight, w1) and torch.equal(ff.w3.weight, w3)
    assert set(model.state_dict()) == set(DualARTransformer.from_weights(TINY, weights).state_dict())
    ff.w3 = torch.nn.Linear(ff.w3.in_features, ff.w3.out_features, bias=False).to(DEVICE)  # replaced after enable
    x = torch.randn(1, 1, ff.w1.in_features, generator=gen(7)).to(DEVICE)
    assert torch.allclose(fused_decode._ffn(ff, x, fused), ff.w2(F.silu(ff.w1(x)) * ff.w3(x)), atol=1e-5)
    assert ff._fused_w13[1].data_ptr() != joined.data_ptr()
