"""The fused top-k / top-p sampling kernel against the eager filter of runtime.sampling (on CPU through triton's
interpreter): the same kept candidates, the same exponential-race winner for the same noise, and the right draw
frequencies through `sample_many`."""
from __future__ import annotations

import pytest
import torch

from kernel_device import kernel_device

DEVICE = kernel_device()  # before the kernels are imported

from s2conv.errors import RuntimeModelError  # noqa: E402
from s2conv.runtime.kernels.sampling import topk_sample  # noqa: E402
from s2conv.runtime.sampling import (  # noqa: E402
    SamplingParams, _round_to, draw_noise, logits_to_probs, sample_embed, sample_many)


def distinct_logits(b: int, v: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[b, v] logits whose 40 highest are distinct (ties make the rank order, and so top-k, arbitrary): a ramp of
    step 0.25 from a random top, so top_p cuts inside the top 30, at random columns; the rest lie below."""
    rows = []
    for _ in range(b):
        top = float(torch.rand(1, generator=gen)) * 4
        row = torch.rand(v, generator=gen) * -20 + top - 12
        n = min(v, 40)
        row[torch.randperm(v, generator=gen)[:n]] = top - 0.25 * torch.arange(n)
        rows.append(row)
    return torch.stack(rows).to(dtype)


def eager_kept(logits: torch.Tensor, idx: torch.Tensor, t: float, p: float, k: int) -> torch.Tensor:
    """[b, k] whether the eager filter gives each top-k candidate a non-zero probability."""
    return logits_to_probs(logits, t, p, k).gather(-1, idx) > 0


def run_kernel(logits, vals, idx, noise, draws, k, select):
    """topk_sample on the device, candidates from torch.topk (vals, idx) or picked in the kernel (select)."""
    dev = [t.to(DEVICE) for t in (logits, vals, idx, noise)]
    if select:
        dev[1] = dev[2] = None
    return topk_sample(dev[0], dev[1], dev[2], dev[3], draws, k).cpu()


# k > V, k = V, V over one normalizer step; candidates from torch.topk or picked in the kernel (one round per
# candidate: slow under the interpreter, so not at k = V = 40)
@pytest.mark.parametrize("v, k, select", [(7, 30, False), (40, 40, False), (1100, 30, False), (7, 30, True),
                                          (300, 12, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_keeps_exactly_the_eager_candidates(dtype, v, k, select):
    """Row j of a batch repeats one logits row with a vanishing noise at rank j only: the race then picks rank j
    exactly when the kernel keeps it, which must be exactly when the eager filter does."""
    gen = torch.Generator().manual_seed(v + k)
    kk = min(k, v)
    for t, p in ((0.8, 0.8), (1.0, 0.3)):
        row = distinct_logits(1, v, dtype, gen)
        logits = row.expand(kk, v).contiguous()
        vals, idx = torch.topk(logits, kk, dim=-1)
        noise = torch.ones(2, kk, kk)
        noise[0] = noise[0].fill_diagonal_(1e-30)
        noise[1] = torch.rand(kk, kk, generator=gen) + 0.5  # second draw: ordinary noise on the same candidates
        draws = [(_round_to(t, dtype), _round_to(p, dtype)), (_round_to(1.0, dtype), _round_to(0.9, dtype))]
        got = run_kernel(logits, vals, idx, noise, draws, k, select)
        kept = eager_kept(row, idx[:1], t, p, k)[0]
        assert torch.equal(got[0] == idx[0], kept), (t, p)
        assert 1 <= int(kept.sum()) < kk or p == 1.0  # the filter really cut something here
        probs = logits_to_probs(logits, 1.0, 0.9, k).gather(-1, idx).float()
        assert torch.equal(got[1], idx.gather(-1, (probs / noise[1]).argmax(-1, keepdim=True))[:, 0])


@pytest.mark.parametrize("select", [False, True], ids=["torch_topk", "in_kernel"])
def test_kernel_race_matches_the_eager_draw_for_the_same_noise(select):
    gen = torch.Generator().manual_seed(3)
    logits = distinct_logits(32, 300, torch.bfloat16, gen)
    vals, idx = torch.topk(logits, 30, dim=-1)
    noise = torch.empty(1, 32, 30).exponential_(generator=gen)
    draws = [(_round_to(0.8, torch.bfloat16), _round_to(0.8, torch.bfloat16))]
    got = run_kernel(logits, vals, idx, noise, draws, 30, select)[0]
    probs = logits_to_probs(logits, 0.8, 0.8, 30).gather(-1, idx).float()
    want = idx.gather(-1, (probs / noise[0]).argmax(-1, keepdim=True))[:, 0]
    assert torch.equal(got, want)
    assert len(set(got.tolist())) > 1  # really random draws, not the argmax every time


@pytest.mark.parametrize("ties", [5, 100, 200], ids=["threshold_ranking", "all_slots", "round_by_round"])
def test_in_kernel_selection_ranks_ties_by_lowest_column(ties):
    """S2's semantic row width (4097 logits): the tied highest logits take the candidate ranks in column order,
    where the kernel ranks the logits above its threshold at once, in its first 64 slots (few ties) or in all
    128 (100 ties), and where more than its 128 slots tie and it falls back to one maximum per round (200 ties).
    Row j's noise vanishes at rank j, so row j draws the candidate of rank j (top_p 1 keeps all 30)."""
    gen = torch.Generator().manual_seed(ties)
    v, k = 4097, 30
    row = torch.rand(v, generator=gen) * 4 - 8
    tied = torch.randperm(v, generator=gen)[:ties]
    row[tied] = 2.0
    ranks = min(ties, k)
    logits = row.expand(ranks, v).contiguous()
    noise = torch.ones(1, ranks, k)
    noise[0, :, :ranks] = noise[0, :, :ranks].fill_diagonal_(1e-30)
    got = run_kernel(logits, logits[:, :k], logits[:, :k].long(), noise, [(1.0, 1.0)], k, True)[0]
    assert torch.equal(got, tied.sort().values[:ranks])


def test_fused_sample_many_frequencies_follow_the_filtered_distribution():
    """300 draws (the interpreter runs a program in milliseconds): 0.12 is about four standard deviations."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -3.0]).expand(300, 5).contiguous().to(DEVICE)
    # untempered softmax .47 .29 .17 .06 .003: cumulative .47 .76 .93 .997
    normal, high = SamplingParams(temperature=0.7, top_p=0.8, top_k=4), SamplingParams(1.0, 0.95, 4, 0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    draws = sample_many(logits, [normal, high], gen, fused=True)
    for params, tokens in zip((normal, high), draws):
        want = logits_to_probs(logits[0].cpu(), params.temperature, params.top_p, params.top_k)
        freq = torch.bincount(tokens.cpu(), minlength=5).float() / len(tokens)
        assert torch.allclose(freq, want, atol=0.12), (params, freq, want)
    assert int(draws[0].max()) <= 1 < int(draws[1].max())  # top_p 0.8 keeps two tokens, 0.95 three


def test_fused_sampling_keeps_shapes_and_greedy():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (tokens,) = sample_many(logits, [SamplingParams()], gen, fused=True)
    assert tokens.shape == (2, 3) and tokens.dtype == torch.int64
    (greedy,) = sample_many(logits, [SamplingParams(temperature=0)], gen, fused=True)
    assert torch.equal(greedy, logits.argmax(-1))


def test_fused_sampling_over_64_candidates_takes_torch_topk():
    """top_k 80 > SELECT_MAX_K: the candidates come from torch.topk; top_p 1 keeps all 80 of the 100 columns."""
    logits = distinct_logits(1, 100, torch.float32, torch.Generator().manual_seed(2)).expand(200, 100)
    params = SamplingParams(temperature=5.0, top_p=1.0, top_k=80)
    (tokens,) = sample_many(logits.contiguous().to(DEVICE), [params], torch.Generator(DEVICE).manual_seed(3), True)
    top80 = set(torch.topk(logits[0], 80).indices.tolist())
    assert set(tokens.cpu().tolist()) <= top80 and len(set(tokens.tolist())) > 40


def test_kernel_rejects_mismatched_noise():
    logits = torch.randn(2, 40).to(DEVICE)
    vals, idx = torch.topk(logits, 8)
    with pytest.raises(RuntimeModelError, match="noise must be fp32 \\[1, 2, 8\\]"):
        topk_sample(logits, vals, idx, torch.ones(1, 2, 7, device=DEVICE), [(1.0, 1.0)])
    with pytest.raises(RuntimeModelError, match="top_k must be 1..64"):
        topk_sample(torch.randn(2, 100, device=DEVICE), None, None, torch.ones(1, 2, 65, device=DEVICE), [(1.0, 1.0)],
                    top_k=65)


def test_sample_many_takes_noise_drawn_ahead():
    """A frame draws its noise once (`draw_noise`) and hands each draw its slice: the tokens are the kernel's for
    that noise (in draw 0 row j's noise vanishes at candidate j, in draw 1 at candidate j + 1 mod 12: row j draws
    those ranks), wider noise is cut to top_k, a single draw takes the first, and noise of the wrong shape is
    refused."""
    logits = distinct_logits(1, 300, torch.float32, torch.Generator().manual_seed(7)).expand(12, 300).contiguous()
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=12)
    noise = torch.ones(3, 12, 16)
    rows = torch.arange(12)
    noise[0, rows, rows] = 1e-30
    noise[1, rows, (rows + 1) % 12] = 1e-30
    noise[2, rows, (rows + 5) % 12] = 1e-30  # a third draw nobody takes
    normal, high = sample_many(logits.to(DEVICE), [params, params], None, True, noise.to(DEVICE))
    ranked = torch.topk(logits[0], 12).indices
    assert torch.equal(normal.cpu(), ranked) and torch.equal(high.cpu(), ranked.roll(-1))
    (first,) = sample_many(logits.to(DEVICE), [params], None, True, noise[1:].to(DEVICE))  # the first draw's noise
    assert torch.equal(first.cpu(), ranked.roll(-1))
    with pytest.raises(RuntimeModelError, match="noise must be \\[>= 2, 12, >= 12\\]"):
        sample_many(logits.to(DEVICE), [params, params], None, True, noise[:1].to(DEVICE))


def test_draw_noise_only_where_the_fused_kernel_samples():
    """On the CPU (no fused sampling by default) and for greedy settings a frame draws no noise ahead: the eager
    sampler keeps drawing its own."""
    assert draw_noise(SamplingParams(), 1, 11, torch.device("cpu")) is None
    if torch.cuda.is_available():
        assert draw_noise(SamplingParams(temperature=0), 1, 11, torch.device("cuda")) is None
        noise = draw_noise(SamplingParams(top_k=30), 2, 11, torch.device("cuda"), torch.Generator("cuda"))
        assert noise.shape == (11, 2, 30) and noise.dtype == torch.float32
        assert bool(((noise >= 0) & noise.isfinite()).all()) and 0.8 < float(noise.mean()) < 1.2  # Exp(1)


@pytest.mark.parametrize("dtype, select", [(torch.bfloat16, True), (torch.float32, False)])
def test_draws_read_from_a_device_tensor_equal_the_host_pairs(dtype, select):
    """(temperature, top_p) pairs handed over as a device tensor (what a kept CUDA graph reads at replay) give the
    tokens of the same pairs rounded on the host, temperature 0 included (floored at 1e-5); the kernel reads the
    tensor's current contents, so new values change the draws without a new launch setup; a tensor of the wrong
    shape is refused."""
    gen = torch.Generator().manual_seed(11)
    logits = distinct_logits(6, 300, dtype, gen)
    k = 24
    vals, idx = torch.topk(logits, k)
    noise = torch.empty(3, 6, k).exponential_(generator=gen)
    pairs = [(0.7, 0.93), (0.0, 0.5), (1.3, 1.0)]
    host = [(_round_to(max(t, 1e-5), dtype), _round_to(p, dtype)) for t, p in pairs]
    values = torch.tensor(pairs, dtype=torch.float32, device=DEVICE)
    want = run_kernel(logits, vals, idx, noise, host, k, select)
    assert torch.equal(run_kernel(logits, vals, idx, noise, values, k, select), want)
    values.copy_(torch.tensor([[1.0, 1e-6]] * 3))  # top_p below every probability: rank 0 only
    assert torch.equal(run_kernel(logits, vals, idx, noise, values, k, select), idx[:, 0].expand(3, 6))
    with pytest.raises(RuntimeModelError, match="draws must be a contiguous fp32 \\[P, 2\\] tensor"):
        run_kernel(logits, vals, idx, noise, values.double(), k, select)


def test_sample_many_takes_its_pairs_from_values():
    """sample_many's values replace the settings' temperature and top_p in the fused kernel (the settings still
    give top_k and the number of draws): the tokens of settings with those numbers, for the same noise."""
    gen = torch.Generator().manual_seed(5)
    logits = distinct_logits(4, 300, torch.bfloat16, gen).to(DEVICE)
    noise = torch.empty(2, 4, 20).exponential_(generator=gen).to(DEVICE)
    a, b = SamplingParams(temperature=0.6, top_p=0.7, top_k=20), SamplingParams(temperature=1.2, top_p=0.95, top_k=20)
    want = sample_many(logits, [b, a], None, True, noise)
    values = torch.tensor([[1.2, 0.95], [0.6, 0.7]], device=DEVICE)
    got = sample_many(logits, [a, a], None, True, noise, values)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("select", [False, True], ids=["torch_topk", "in_kernel"])
def test_kernel_hands_over_the_table_rows_of_its_tokens(select):
    """With a table the kernel also copies the table rows of draw 0's tokens (the next decode step's input, where a
    gather launch followed the draw): the tokens are those drawn without it, the rows equal table[tokens] bit for
    bit, at a width the copy loop does not divide, from a table whose row stride is not its width (a column
    slice); a table with fewer rows than logits is refused."""
    gen = torch.Generator().manual_seed(5)
    logits = distinct_logits(5, 300, torch.bfloat16, gen)
    k = 24
    vals, idx = torch.topk(logits, k)
    noise = torch.empty(2, 5, k).exponential_(generator=gen)
    draws = [(0.8, 0.8), (1.0, 0.95)]
    table = torch.randn(303, 1152, generator=gen).to(torch.bfloat16).to(DEVICE)[:, :1100]
    args = [t.to(DEVICE) for t in (logits, vals, idx, noise)]
    if select:
        args[1] = args[2] = None
    want = topk_sample(*args, draws, k)
    tokens, rows = topk_sample(*args, draws, k, table)
    assert torch.equal(tokens.cpu(), want.cpu())
    assert rows.dtype == table.dtype and torch.equal(rows.cpu(), table.cpu()[want[0].cpu()])
    with pytest.raises(RuntimeModelError, match="table must be \\[>= 300, D\\]"):
        topk_sample(*args, draws, k, table[:299])


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_sample_embed_returns_the_tokens_and_their_rows(fused):
    """`sample_embed` (a fast-AR depth's draw and the next depth's input) gives `sample`'s tokens for the same noise
    and the table's rows of them, the fused kernel and the eager fallback alike, for logits with leading dims."""
    gen = torch.Generator().manual_seed(9)
    logits = distinct_logits(6, 300, torch.float32, gen).reshape(2, 3, 300).to(DEVICE)
    table = torch.randn(300, 40, generator=gen).to(DEVICE)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20)
    noise = torch.empty(1, 6, 20).exponential_(generator=gen).to(DEVICE) if fused else None
    tokens, rows = sample_embed(logits, params, table, torch.Generator(DEVICE).manual_seed(3), fused, noise)
    want = sample_many(logits, [params], torch.Generator(DEVICE).manual_seed(3), fused, noise)[0]
    assert tokens.shape == (2, 3) and torch.equal(tokens, want)
    assert rows.shape == (2, 3, 40) and torch.equal(rows, table[want])
