"""Runtime math (dual AR, codec, sampling) against the float64 reference in tests/reference_math.py.

Tolerances: fp32 runtime vs float64 reference to ~1e-5 relative (we assert 1e-4 on max-abs / max-magnitude); bf16
runtime to a few 1e-2 relative (we assert 6e-2) — bf16 keeps 8 mantissa bits and rounds after every op.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import reference_math as ref
from s2conv.errors import RuntimeModelError
from s2conv.runtime.codec import Codec
from s2conv.runtime.dual_ar import DualARTransformer, generate
from s2conv.runtime.layers import HeadRMSNorm, RMSNorm
from s2conv.runtime.rope import apply_rotary_emb, precompute_freqs_cis
from s2conv.runtime.sampling import SamplingParams, logits_to_probs, ras_select, sample, sample_from_probs
from s2conv.schema import CodecConfig, S2Config, hf_to_model_name, model_tensor_shapes

FIXTURES = Path(__file__).parent / "fixtures"

TINY = S2Config().replace(
    vocab_size=300, n_layer=2, dim=128, n_head=4, n_local_heads=2, head_dim=32, intermediate_size=256,
    max_seq_len=256, n_fast_layer=1, fast_dim=128, fast_n_head=4, fast_n_local_heads=2, fast_head_dim=32,
    fast_intermediate_size=256, codebook_size=64, num_codebooks=10, semantic_begin_id=200, semantic_end_id=263,
    eos_token_id=150, pad_token_id=151, audio_pad_token_id=152)

TINY_CODEC = CodecConfig(
    encoder_dim=4, encoder_rates=(2, 2), decoder_dim=16, decoder_rates=(2, 2), latent_dim=16,
    encoder_transformer_layers=(0, 1), encoder_transformer_window=4, codebook_dim=4, semantic_codebook_size=32,
    n_residual_codebooks=9, residual_codebook_size=16, downsample_factor=(2, 2), rvq_n_layer=2, n_head=2,
    head_dim=8, intermediate_size=48, rvq_window=4)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def random_s2_weights(cfg: S2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for hf, shape in model_tensor_shapes(cfg).items():
        name = hf_to_model_name(hf)
        if len(shape) == 1:  # norm weights, including q_norm / k_norm: non-uniform so placement matters
            out[name] = 1 + 0.3 * torch.randn(shape, generator=g)
        elif "embeddings" in name:
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return out


def random_codec_weights(cc: CodecConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Codec(cc).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("alpha"):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("gamma"):
            out[name] = 0.3 + 0.5 * torch.rand(shape, generator=g)
        elif len(shape) == 1 and ("norm" in name):
            out[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # biases
            out[name] = 0.1 * torch.randn(shape, generator=g)
        elif "codebook" in name:
            out[name] = torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1)
            if re.fullmatch(r"quantizer\.upsample\.\d+\.0\.conv\.weight|decoder\.model\.\d+\.block\.1\.conv\.weight",
                            name):  # transposed conv [in, out, k]
                fan_in = shape[0] * shape[2] // 2
            out[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if re.search(r"block\.3\.conv\.weight$", name):  # residual branch: keep activations O(1)
                out[name] *= 0.3
    last = f"decoder.model.{len(cc.decoder_rates) + 2}.conv.weight"
    out[last] *= 0.1  # keep tanh out of saturation so the waveform comparison means something
    return out


def random_prompt(cfg: S2Config, t: int, seed: int = 1) -> torch.Tensor:
    """[11, t]: text tokens then semantic frames (row0 = begin + code0, rows 1..10 = codes)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(cfg.num_codebooks + 1, t, dtype=torch.long)
    n_text = t // 2
    p[0, :n_text] = torch.randint(0, cfg.semantic_begin_id, (n_text,), generator=g)
    codes = torch.randint(0, cfg.codebook_size, (cfg.num_codebooks, t - n_text), generator=g)
    p[1:, n_text:] = codes
    p[0, n_text:] = cfg.semantic_begin_id + codes[0]
    return p


@pytest.fixture(scope="module")
def s2_weights():
    return random_s2_weights(TINY)


@pytest.fixture(scope="module")
def codec_weights():
    return random_codec_weights(TINY_CODEC)


# ------------------------------------------------------------------------------------------- names


def test_dual_ar_state_dict_names_equal_model_tensor_names():
    cfg = S2Config()
    with torch.device("meta"):
        model = DualARTransformer(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {hf_to_model_name(k): tuple(v) for k, v in model_tensor_shapes(cfg).items()}
    assert got == want


def _fold_name(name: str) -> str:
    name = name.replace(".parametrizations.weight.original1", ".weight")
    return re.sub(r"\.weight_v$", ".weight", name)


def test_codec_state_dict_names_equal_folded_release_names():
    release = json.loads((FIXTURES / "s2-pro-codec-tensors.json").read_text())
    want = {_fold_name(k): tuple(v) for k, v in release.items()
            if not k.endswith(("original0", "weight_g"))}
    with torch.device("meta"):
        got = {k: tuple(v.shape) for k, v in Codec(CodecConfig()).state_dict().items()}
    assert got == want


def test_from_weights_rejects_missing_tensor(s2_weights):
    w = dict(s2_weights)
    del w["layers.1.attention.q_norm.weight"]
    with pytest.raises(RuntimeModelError, match="q_norm"):
        DualARTransformer.from_weights(TINY, w, torch.float32)


# ------------------------------------------------------------------------------------------- rope / norms


def test_rope_table_bit_exact_vs_errata_recipe():
    for n, hd, base in ((32768, 128, 1e6), (1000, 64, 10000.0)):
        f = 1.0 / (base ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        ang = torch.outer(torch.arange(n).float(), f)
        cis = torch.polar(torch.ones_like(ang), ang)
        want = torch.view_as_real(cis).to(torch.bfloat16)
        got = precompute_freqs_cis(n, hd, base)
        assert got.dtype == torch.bfloat16 and got.shape == (n, hd // 2, 2)
        assert torch.equal(got, want)
    # the recipe matters: cos/sin in fp32 instead of polar disagrees in some bf16 entries of the slow table
    f = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    ang = torch.outer(torch.arange(32768).float(), f)
    other = torch.stack([ang.cos(), ang.sin()], -1).to(torch.bfloat16)
    assert not torch.equal(other, precompute_freqs_cis(32768, 128, 1e6))


def test_rope_rotates_adjacent_pairs():
    table = precompute_freqs_cis(8, 4, 10000.0)
    x = torch.zeros(1, 8, 1, 4)
    x[..., 0] = 1.0  # pair 0 = (1, 0), pair 1 = (0, 0)
    y = apply_rotary_emb(x, table)
    assert torch.equal(y[0, :, 0, 0:2], table[:, 0].float())
    assert torch.equal(y[0, :, 0, 2:], torch.zeros(8, 2))


def test_qk_norm_uses_torch_rmsnorm_rounding_and_other_norms_round_twice():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    w = (1 + torch.randn(128, generator=g)).to(torch.bfloat16)
    head = HeadRMSNorm(128, 1e-6).to(torch.bfloat16)
    head.weight.data.copy_(w)
    torch_norm = torch.nn.RMSNorm(128, 1e-6).to(torch.bfloat16)
    torch_norm.weight.data.copy_(w)
    assert torch.equal(head(x), torch_norm(x))
    fish = RMSNorm(128, 1e-6).to(torch.bfloat16)
    fish.weight.data.copy_(w)
    xf = x.float()
    two_roundings = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
    assert torch.equal(fish(x), two_roundings)
    assert not torch.equal(fish(x), head(x))


# ------------------------------------------------------------------------------------------- dual AR


def test_embedding_scales_semantic_positions_only(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    p = random_prompt(TINY, 6)
    x = model.embed(p[None])[0]
    E, C = s2_weights["embeddings.weight"], s2_weights["codebook_embeddings.weight"]
    assert torch.allclose(x[0], E[p[0, 0]])  # text position: plain embedding
    want = (E[p[0, 5]] + sum(C[p[i + 1, 5] + 64 * i] for i in range(10))) / math.sqrt(11)
    assert torch.allclose(x[5], want, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_prefill_and_cached_decode_match_reference(s2_weights, dtype, tol):
    model = DualARTransformer.from_weights(TINY, s2_weights, dtype)
    model.setup_caches(1, 64)
    p = random_prompt(TINY, 12)
    h_ref, logits_ref = ref.slow_forward(TINY, s2_weights, p)
    hidden, sem = model.prefill(p[None, :, :11])
    assert rel_err(hidden[0], h_ref[10]) < tol
    assert rel_err(model.logits(hidden)[0], logits_ref[10]) < tol
    # cached decode of the 12th column at position 11
    hidden, sem = model.decode_slow(p[None, :, 11:12], torch.tensor([11]))
    assert rel_err(hidden[0], h_ref[11]) < tol
    allowed = list(range(TINY.semantic_begin_id, TINY.semantic_end_id + 1)) + [TINY.eos_token_id]
    assert rel_err(sem[0], logits_ref[11, allowed]) < tol


def test_semantic_logits_equal_full_head_rows(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    h = torch.randn(3, TINY.dim)
    full, sem = model.logits(h), model.semantic_logits(h)
    assert sem.shape == (3, 65)
    assert torch.allclose(sem[:, :64], full[:, 200:264], atol=1e-5)
    assert torch.allclose(sem[:, 64], full[:, 150], atol=1e-5)
    idx = torch.tensor([0, 63, 64])
    assert model.semantic_index_to_token(idx).tolist() == [200, 263, 150]


def test_greedy_frame_matches_reference_fast_ar(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    model.setup_caches(1, 32)
    p = random_prompt(TINY, 10)
    hidden, sem = model.prefill(p[None])
    frame = model.sample_frame(hidden, sem, SamplingParams(temperature=0))[0]
    h_ref, logits_ref = ref.slow_forward(TINY, s2_weights, p)
    allowed = list(range(200, 264)) + [150]
    main = allowed[int(logits_ref[-1, allowed].argmax())]
    assert int(frame[0]) == main
    assert int(frame[1]) == min(max(main - 200, 0), 63)  # codebook 0 from the main token, not the fast head
    codes = [int(frame[1])]
    for k in range(1, 10):  # the fast AR's position-0 logits are never used
        fast_logits = ref.fast_forward(TINY, s2_weights, h_ref[-1], codes)
        codes.append(int(fast_logits[k].argmax()))
    assert frame[1:].tolist() == codes


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_fast_step_logits_match_reference(s2_weights, dtype, tol):
    model = DualARTransformer.from_weights(TINY, s2_weights, dtype)
    model.setup_caches(1, 16)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(TINY.dim, generator=g)
    codes = torch.randint(0, 64, (9,), generator=g).tolist()
    want = ref.fast_forward(TINY, s2_weights, h, codes)
    model.fast_step(h.to(dtype)[None, None], 0)
    for k in range(1, 10):
        x = model.fast_step(model.fast_embeddings(torch.tensor([codes[k - 1]]))[:, None], k)
        assert rel_err(model.fast_logits(x[:, 0])[0], want[k]) < tol


def test_sampled_main_tokens_are_semantic_or_eos(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    model.setup_caches(1, 32)
    p = random_prompt(TINY, 10)
    hidden, sem = model.prefill(p[None])
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.5, top_p=1.0, top_k=65)
    for _ in range(20):
        frame = model.sample_frame(hidden, sem, params, g)
        main = int(frame[0, 0])
        assert 200 <= main <= 263 or main == 150
        assert all(0 <= c < 64 for c in frame[0, 1:].tolist())


def _force_eos_at(model, n_call):
    calls = {"n": 0}
    original = model.semantic_logits

    def patched(h):
        calls["n"] += 1
        out = original(h).clone()
        out[:, -1] = 1e4 if calls["n"] == n_call else -1e4
        return out
    model.semantic_logits = patched


def test_generate_stops_at_eos_and_drops_that_frame(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    _force_eos_at(model, 4)  # prefill frame + 2 decode frames, the 4th main token is <|im_end|>
    codes = generate(model, random_prompt(TINY, 8), 20, SamplingParams(temperature=0))
    assert codes.shape == (10, 3)
    assert int(codes.max()) < 64 and int(codes.min()) >= 0


def test_generate_respects_max_new_frames_and_is_seeded(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    prompt = random_prompt(TINY, 8)
    _force_eos_at(model, -1)  # never <|im_end|>: the frame limit must stop generation
    runs = [generate(model, prompt, 5, params, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0].shape == (10, 5)
    assert torch.equal(runs[0], runs[1])
    greedy = [generate(model, prompt, 5, SamplingParams(temperature=0)) for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])
    with pytest.raises(RuntimeModelError, match="max_seq_len"):
        generate(model, prompt, TINY.max_seq_len, params)


# ------------------------------------------------------------------------------------------- sampling


def direct_filter(logits, temperature, top_p, top_k):
    """Straightforward fish-speech semantics on one row (fp32), loop form."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    sorted_logits = torch.tensor([float(logits[i]) for i in order])
    cum = torch.cumsum(torch.softmax(sorted_logits, 0), 0)
    keep = [r == 0 or (r < top_k and float(cum[r]) <= top_p) for r in range(len(order))]
    out = torch.full((len(logits),), float("-inf"))
    for r, i in enumerate(order):
        if keep[r]:
            out[i] = float(logits[i]) / max(temperature, 1e-5)
    return torch.softmax(out, 0)


@pytest.mark.parametrize("t,p,k", [(1.0, 0.9, 30), (0.7, 0.5, 100), (1.3, 1.0, 5), (0.8, 0.01, 30)])
def test_logits_to_probs_matches_direct_implementation(t, p, k):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    got = logits_to_probs(logits, t, p, k)
    for row in range(4):
        assert torch.allclose(got[row], direct_filter(logits[row], t, p, k), atol=1e-6)


def test_top_p_uses_untempered_logits_and_keeps_top_token():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # softmax(logits) = .64, .24, .09, .03 -> cumulative .64, .88, .97, 1: a rank whose cumulative probability
    # exceeds top_p is dropped (fish semantics), so top_p .9 keeps two tokens whatever the temperature
    for t in (0.1, 1.0, 5.0):
        assert (logits_to_probs(logits, t, 0.9, 10) > 0).tolist() == [True, True, False, False]
        assert (logits_to_probs(logits, t, 0.87, 10) > 0).tolist() == [True, False, False, False]
    assert (logits_to_probs(logits, 1.0, 0.01, 10) > 0).tolist() == [True, False, False, False]


def test_sampling_frequencies_follow_probs():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(20000, 4)
    draws = sample_from_probs(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015)


def test_greedy_and_seeded_sampling():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1)):
        assert torch.equal(sample(logits, params), logits.argmax(-1))
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=100)
    a = sample(logits, params, torch.Generator().manual_seed(5))
    b = sample(logits, params, torch.Generator().manual_seed(5))
    c = sample(logits, params, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ras_uses_high_sample_for_repeated_semantic_token():
    normal = torch.tensor([205, 205, 150, 207])
    high = torch.tensor([230, 231, 232, 233])
    previous = torch.tensor([[0, 205], [0, 0], [150, 150], [1, 2]])
    repeatable = torch.tensor([True, True, False, True])
    assert ras_select(normal, high, previous, repeatable).tolist() == [230, 205, 150, 207]


def test_ras_in_model_replaces_repeated_token(s2_weights):
    model = DualARTransformer.from_weights(TINY, s2_weights, torch.float32)
    logits = torch.full((1, 65), -10.0)
    logits[0, 3] = 10.0  # normal sample (top_p .8) is always token 203
    params = SamplingParams(temperature=0.8, top_p=0.8, top_k=65, ras_temperature=1.0, ras_top_p=1.0)
    g = torch.Generator().manual_seed(0)
    assert int(model.sample_main(logits, params, g, torch.tensor([[0, 0]]))) == 203
    logits[0, :] = 0.0
    logits[0, 3] = 0.5  # now normal and high both spread; with 203 in the window, the high draw is taken
    hits = [int(model.sample_main(logits, SamplingParams(temperature=1e-3, top_p=1.0, top_k=65), g,
                                  torch.tensor([[203, 0]]))) for _ in range(50)]
    assert any(h != 203 for h in hits)


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                dict(ras_window=-1)])
def test_bad_sampling_params_rejected(kw):
    with pytest.raises(RuntimeModelError):
        SamplingParams(**kw)


# ------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_codec_decode_matches_reference(codec_weights, dtype, tol):
    codec = Codec.from_weights(TINY_CODEC, codec_weights, dtype)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (10, 9), generator=g)
    codes[0] = torch.randint(0, 40, (9,), generator=g)  # some semantic codes out of range: clamped
    wav = codec.decode(codes[None])
    assert wav.shape == (1, 1, 9 * TINY_CODEC.frame_length)
    assert rel_err(wav[0, 0], ref.codec_decode(TINY_CODEC, codec_weights, codes)) < tol


def test_codec_decode_is_causal(codec_weights):
    codec = Codec.from_weights(TINY_CODEC, codec_weights, torch.float32)
    codes = torch.randint(0, 16, (1, 10, 12), generator=torch.Generator().manual_seed(1))
    changed = codes.clone()
    changed[..., 7:] = (changed[..., 7:] + 5) % 16
    a, b = codec.decode(codes), codec.decode(changed)
    fl = TINY_CODEC.frame_length
    assert torch.allclose(a[..., : 7 * fl], b[..., : 7 * fl], atol=1e-6)
    assert (a[..., 7 * fl:] - b[..., 7 * fl:]).abs().max() > 1e-2


def test_codec_streaming_decode_equals_full_decode(codec_weights):
    codec = Codec.from_weights(TINY_CODEC, codec_weights, torch.float32)
    codes = torch.randint(0, 16, (1, 10, 23), generator=torch.Generator().manual_seed(2))
    full = codec.decode(codes)
    chunks = list(codec.decode_streaming(codes, chunk=5, history=40))
    assert [c.shape[-1] for c in chunks] == [5 * 16] * 4 + [3 * 16]
    assert torch.allclose(torch.cat(chunks, -1), full, atol=1e-5)


def test_codec_encode_matches_reference_and_lengths(codec_weights):
    codec = Codec.from_weights(TINY_CODEC, codec_weights, torch.float32)
    wav = 0.5 * torch.randn(1, 1, 150, generator=torch.Generator().manual_seed(3))
    codes = codec.encode(wav)
    assert codes.shape == (1, 10, math.ceil(150 / TINY_CODEC.frame_length))
    assert torch.equal(codes[0], ref.codec_encode(TINY_CODEC, codec_weights, wav[0, 0]))
    assert codec.decode(codes).shape == (1, 1, codes.shape[-1] * TINY_CODEC.frame_length)


def test_vq_picks_cosine_nearest_code(codec_weights):
    codec = Codec.from_weights(TINY_CODEC, codec_weights, torch.float32)
    vq = codec.quantizer.quantizer.quantizers[0]
    with torch.no_grad():
        vq.in_proj.weight.zero_()
        vq.in_proj.weight[:, :4, 0] = torch.eye(4)  # z_e = first 4 channels of z
        vq.in_proj.bias.zero_()
    book = vq.codebook.weight
    z = torch.zeros(1, 16, 16)
    z[0, :4] = (book * torch.linspace(0.1, 5, 16)[:, None]).T  # scaled copies: cosine distance ignores scale
    assert vq.encode(z)[0].tolist() == list(range(16))


def test_codec_rejects_bad_shapes(codec_weights):
    codec = Codec.from_weights(TINY_CODEC, codec_weights, torch.float32)
    with pytest.raises(RuntimeModelError, match="codes shape"):
        codec.decode(torch.zeros(1, 9, 4, dtype=torch.long))
    with pytest.raises(RuntimeModelError, match="waveform shape"):
        codec.encode(torch.zeros(1, 100))
