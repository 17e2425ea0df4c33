"""Batched decode steps through the fused kernels (per-row RoPE rows and key offsets of left-padded prompts) vs the
eager batched code of batch.py, on CPU through triton's interpreter at tiny shapes."""
from __future__ import annotations

import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.errors import RuntimeModelError  # noqa: E402
from s2conv.runtime import fused_decode  # noqa: E402
from s2conv.runtime.batch import (forward_slow_rows, generate_frames_batch, left_pad,  # noqa: E402
                                  prefill_batch, row_mask)
from s2conv.runtime.dual_ar import DualARTransformer  # noqa: E402
from s2conv.runtime.kernels import fused  # noqa: E402
from s2conv.runtime.layers import HeadRMSNorm, KVCache  # noqa: E402
from s2conv.runtime.rope import apply_rotary_emb, precompute_freqs_cis  # noqa: E402
from s2conv.runtime.sampling import SamplingParams  # noqa: E402
from test_batch import _force_eos_rows  # noqa: E402
from test_fused_decode import attention_kernel, close, eager_attention  # noqa: E402,F401 (a fixture)
from test_runtime_math import TINY, random_prompt, random_s2_weights  # noqa: E402


DTYPES = [torch.float32, torch.bfloat16]
GREEDY = SamplingParams(temperature=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- qk norm + per-row rope + cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_cache_with_a_table_row_per_batch_row(dtype):
    b, n_head, n_kv, d, max_seq, pos = 3, 4, 2, 32, 24, 17
    offsets = torch.tensor([0, 5, 20], device=DEVICE)  # row 2 is still padding at pos 17: RoPE position clamps to 0
    qkv = (torch.randn(b, 1, (n_head + 2 * n_kv) * d, generator=gen()) * 3).to(dtype).to(DEVICE)
    table = precompute_freqs_cis(max_seq, d, 10000.0).to(DEVICE)
    pos_t = torch.tensor([pos], device=DEVICE)
    freqs = table[(pos_t[None, :] - offsets[:, None]).clamp(min=0)]  # [B, 1, D/2, 2], as forward_slow_rows
    qn, kn = HeadRMSNorm(d, 1e-6).to(DEVICE), HeadRMSNorm(d, 1e-6).to(DEVICE)
    for i, m in enumerate((qn, kn)):
        m.weight.data = (1 + 0.3 * torch.randn(d, generator=gen(5 + i))).to(dtype).to(DEVICE)
    cache = KVCache(b, n_kv, max_seq, d, dtype, DEVICE)
    sentinel = torch.randn(cache.k_cache.shape, generator=gen(9)).to(dtype).to(DEVICE)
    cache.k_cache.copy_(sentinel)
    cache.v_cache.copy_(-sentinel)

    q, k, v = qkv.split([n_head * d, n_kv * d, n_kv * d], dim=-1)  # Attention.forward's steps
    q_want = apply_rotary_emb(qn(q.view(b, 1, n_head, d)), freqs).transpose(1, 2)
    k_want = apply_rotary_emb(kn(k.view(b, 1, n_kv, d)), freqs).transpose(1, 2)
    got = fused.qk_norm_rope_cache(qkv, qn.weight, kn.weight, freqs, cache.k_cache, cache.v_cache, pos_t, n_head,
                                   n_kv, 1e-6)
    assert close(got, q_want) and close(cache.k_cache[:, :, pos:pos + 1], k_want)
    assert torch.equal(cache.v_cache[:, :, pos:pos + 1], v.view(b, 1, n_kv, d).transpose(1, 2))
    others = torch.arange(max_seq, device=DEVICE) != pos
    assert torch.equal(cache.k_cache[:, :, others], sentinel[:, :, others])
    # the rows really rotate by different angles: row 1 with row 0's table row gives another q
    shared = fused.qk_norm_rope_cache(qkv, qn.weight, kn.weight, freqs[:1], cache.k_cache, cache.v_cache, pos_t,
                                      n_head, n_kv, 1e-6)
    assert close(shared[0], got[0]) and float((shared[1].float() - got[1].float()).abs().max()) > 0.1
    with pytest.raises(RuntimeModelError, match="freqs_cis_row"):
        fused.qk_norm_rope_cache(qkv, qn.weight, kn.weight, freqs[:2], cache.k_cache, cache.v_cache, pos_t,
                                 n_head, n_kv, 1e-6)


# ---- attention with per-row key offsets ------------------------------------------------------------------------------
def eager_row_attention(q, k_cache, v_cache, pos, span, offsets, explicit):
    """Attention.forward's masked attention of one position with a per-row mask: row_mask, K/V repeated per query head."""
    mask = row_mask(torch.tensor([pos], device=q.device), offsets, span)  # [B, 1, 1, span]
    return eager_attention(q, k_cache, v_cache, pos, span, explicit, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv,pos,span", [(2, 9, 16), (1, 70, 128), (2, 200, 320)])
def test_decode_attention_reads_each_rows_own_keys(dtype, n_kv, pos, span, attention_kernel):
    b, n_head, d, max_seq = 4, 4, 32, 320
    offsets = torch.tensor([0, 3, pos, pos // 2 + 1], device=DEVICE)  # row 2: only key pos is valid
    g = gen(3)
    q = torch.randn(b, n_head, 1, d, generator=g).to(dtype).to(DEVICE)
    k_cache = torch.randn(b, n_kv, max_seq, d, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(b, n_kv, max_seq, d, generator=g).to(dtype).to(DEVICE)
    k_cache[:, :, pos + 1:] = 1e4  # garbage past pos and inside each row's padding must not leak
    for row, off in enumerate(offsets.tolist()):
        k_cache[row, :, :off] = 1e4
    got = fused.decode_attention(q, k_cache, v_cache, torch.tensor([pos], device=DEVICE), span, offsets=offsets)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for explicit in (False, True):
        want = eager_row_attention(q, k_cache, v_cache, pos, span, offsets, explicit)
        assert got.shape == want.shape and got.dtype == dtype
        assert float((got.float() - want.float()).abs().max()) < tol * max(1.0, float(want.abs().max()))
    # row 2 reads key pos alone: its output is v at pos of each query head's KV head
    n_rep = n_head // n_kv
    assert torch.allclose(got[2, 0].view(n_head, d), v_cache[2, :, pos].repeat_interleave(n_rep, 0), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits_span", [256, 1024])
def test_decode_attention_offsets_across_splits_and_padded_queries(splits_span, dtype, attention_kernel):
    # several key splits, offsets inside and beyond split boundaries, and a padded query (pos < offset): the split
    # path merges empty splits without NaN and the padded query reads its own slot, as row_mask says
    b, n_head, n_kv, d, pos = 3, 2, 1, 16, 150
    offsets = torch.tensor([130, 64, 200], device=DEVICE)
    assert fused.attention_splits(splits_span, b * n_head, torch.device(DEVICE))[0] > 1
    assert fused.attention_splits(splits_span, b * n_kv, torch.device(DEVICE), 64, fused.ATTN_GQA_PER_SM)[0] > 1
    g = gen(4)
    q = torch.randn(b, n_head, 1, d, generator=g).to(dtype).to(DEVICE)
    kc = torch.randn(b, n_kv, splits_span, d, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(b, n_kv, splits_span, d, generator=g).to(dtype).to(DEVICE)
    got = fused.decode_attention(q, kc, vc, pos, splits_span, offsets=offsets)
    want = eager_row_attention(q.float(), kc.float(), vc.float(), pos, splits_span, offsets, False)
    assert torch.isfinite(got).all()
    assert float((got.float() - want).abs().max()) < (1e-5 if dtype == torch.float32 else 2**-7)
    assert torch.allclose(got[2, 0], vc[2, 0, pos].repeat(n_head), atol=1e-6)
    with pytest.raises(RuntimeModelError, match="offsets"):
        fused.decode_attention(q, kc, vc, pos, splits_span, offsets=offsets[:2])


# ---- whole batched decode -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights():
    return random_s2_weights(TINY)


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(TINY, t, seed=20 + i).to(DEVICE) for i, t in enumerate((9, 4, 13))]


def test_greedy_batch_with_fused_kernels_equals_eager_batch(weights, prompts, monkeypatch):
    def model():
        m = DualARTransformer.from_weights(TINY, weights, torch.float32, device=DEVICE)
        _force_eos_rows(m, (-1, 3, -1))  # row 1 stops at its second frame, the others run on
        return m

    want = generate_frames_batch(model(), prompts, 3, GREEDY, use_graphs=False)
    fast = model()
    assert fused_decode.enable(fast, force=True)
    calls = []
    original = fused.decode_attention
    monkeypatch.setattr(fused, "decode_attention",
                        lambda *a, **kw: calls.append(len(a) > 6 and a[6] is not None) or original(*a, **kw))
    got = generate_frames_batch(fast, prompts, 3, GREEDY, use_graphs=False)
    # 2 decode steps through the slow blocks with row offsets; 10 depth steps per frame through the fast blocks
    # without (the prefill frame too), except the last fast layer at depth 0, which only fills its cache
    assert calls.count(True) == 2 * TINY.n_layer
    assert calls.count(False) == 3 * (TINY.num_codebooks * TINY.n_fast_layer - 1)
    assert [c.shape for c in got] == [c.shape for c in want] == [(10, 3), (10, 2), (10, 3)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_bf16_batched_decode_step_with_fused_kernels_is_close_to_eager(weights, prompts):
    """Teacher-forced: the same frame columns through both paths give slow hidden states within bf16 tolerance,
    for two positions (the second reads keys the fused path wrote), and every row is finite."""
    tokens, offsets = left_pad(prompts)
    t = tokens.shape[2]
    eager, fast = (DualARTransformer.from_weights(TINY, weights, torch.bfloat16, device=DEVICE) for _ in range(2))
    assert fused_decode.enable(fast, force=True)
    for m in (eager, fast):
        prefill_batch(m, tokens, offsets, 8, GREEDY)
    column = tokens[:, :, -1:]
    for step in range(2):
        pos = torch.tensor([t + step], device=DEVICE)
        he, hf = (forward_slow_rows(m, column, pos, offsets, m.max_seq) for m in (eager, fast))
        assert torch.isfinite(hf).all()
        assert float((hf.float() - he.float()).abs().max() / he.float().abs().max()) < 2**-5
