"""The static-buffer frame loop (CUDA-graph replay on GPUs, eager here) decodes exactly like `generate`."""
import dataclasses

import pytest
import torch

from s2conv.runtime.dual_ar import DualARTransformer, generate
from s2conv.runtime.frame_loop import generate_frames
from s2conv.runtime.sampling import SamplingParams
from test_runtime_math import TINY, _force_eos_at, random_prompt, random_s2_weights

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def weights():
    return random_s2_weights(TINY)


@pytest.mark.parametrize("eos_at", [1, 2, 3, 6, -1])
@pytest.mark.parametrize("max_frames", [1, 2, 5])
def test_greedy_frames_equal_generate(weights, eos_at, max_frames):
    model = DualARTransformer.from_weights(TINY, weights, torch.float32)
    _force_eos_at(model, eos_at)  # call 1 is the prefill frame
    prompt = random_prompt(TINY, 8)
    expected = generate(model, prompt, max_frames, GREEDY)
    model2 = DualARTransformer.from_weights(TINY, weights, torch.float32)
    _force_eos_at(model2, eos_at)
    got = generate_frames(model2, prompt, max_frames, GREEDY, use_graphs=False)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_sampled_frames_are_seeded_and_use_ras(weights):
    model = DualARTransformer.from_weights(TINY, weights, torch.float32)
    _force_eos_at(model, -1)
    prompt = random_prompt(TINY, 8)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    a = generate_frames(model, prompt, 12, params, seed=3, use_graphs=False)
    b = generate_frames(model, prompt, 12, params, seed=3, use_graphs=False)
    c = generate_frames(model, prompt, 12, params, seed=4, use_graphs=False)
    assert a.shape == (10, 12) and torch.equal(a, b) and not torch.equal(a, c)


def test_the_loop_is_kept_between_calls_until_its_settings_or_caches_change(weights, monkeypatch):
    """A second call with the same settings decodes through the same FrameLoop (on a GPU: its captured graphs)
    and gives the same frames; other sampling settings, more frames than it holds, or reallocated KV caches get a
    new one, as does every call with S2CONV_FRAME_LOOP_CACHE=0."""
    model = DualARTransformer.from_weights(TINY, weights, torch.float32)
    _force_eos_at(model, -1)
    prompt = random_prompt(TINY, 8)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    a = generate_frames(model, prompt, 12, params, seed=3, use_graphs=False)
    loop = model.frame_loop
    assert torch.equal(generate_frames(model, prompt, 12, params, seed=3, use_graphs=False), a)
    assert model.frame_loop is loop
    assert torch.equal(generate_frames(model, prompt, 7, params, seed=3, use_graphs=False), a[:, :7])
    assert model.frame_loop is loop  # fewer frames than it holds
    generate_frames(model, prompt, 12, dataclasses.replace(params, temperature=0.9), seed=3, use_graphs=False)
    assert model.frame_loop is not loop  # sampling on the CPU is eager: its temperature is part of the key
    generate_frames(model, prompt, 12, params, seed=3, use_graphs=False)
    loop = model.frame_loop
    generate_frames(model, prompt, 13, params, seed=3, use_graphs=False)
    assert model.frame_loop is not loop  # more frames than it held
    loop = model.frame_loop
    generate_frames(model, prompt, 13, GREEDY, use_graphs=False)
    assert model.frame_loop is not loop and model.frame_loop.params == GREEDY
    loop = model.frame_loop
    model.max_batch = 0  # the next setup_caches reallocates the KV caches
    generate_frames(model, prompt, 13, GREEDY, use_graphs=False)
    assert model.frame_loop is not loop
    loop = model.frame_loop
    monkeypatch.setenv("S2CONV_FRAME_LOOP_CACHE", "0")
    generate_frames(model, prompt, 13, GREEDY, use_graphs=False)
    assert model.frame_loop is not loop


def _long_model(weights, device="cpu"):
    """TINY with room for several KV steps and attention spans (TINY itself holds one span of 256)."""
    model = DualARTransformer.from_weights(dataclasses.replace(TINY, max_seq_len=3000), weights, torch.float32,
                                           device=device)
    _force_eos_at(model, -1)
    return model


def test_kv_caches_grow_in_steps_and_a_reallocation_drops_the_loop(weights):
    """Longer prompts within one KV_STEP keep the caches (and so the loop's graphs) of the call before; past it
    the caches are reallocated and the loop released with them."""
    from s2conv.runtime.frame_loop import KV_STEP
    model = _long_model(weights)
    generate_frames(model, random_prompt(TINY, 8), 4, GREEDY, use_graphs=False)
    version, loop = model.cache_version, model.frame_loop
    assert model.max_seq == KV_STEP
    generate_frames(model, random_prompt(TINY, 600), 4, GREEDY, use_graphs=False)
    assert model.cache_version == version and model.frame_loop is loop
    model.setup_caches(1, KV_STEP + 1)
    assert model.max_seq == KV_STEP + 8 and model.cache_version == version + 1 and model.frame_loop is None
    generate_frames(model, random_prompt(TINY, 1100), 4, GREEDY, use_graphs=False)
    assert model.max_seq == 2 * KV_STEP and model.frame_loop is not loop


def test_replaced_or_reloaded_weights_get_a_new_loop(weights):
    """A parameter replaced by a new tensor, or changed in place (its version moves), makes the kept loop stale."""
    model = _long_model(weights)
    prompt = random_prompt(TINY, 8)
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    loop = model.frame_loop
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    assert model.frame_loop is loop
    model.norm.weight = torch.nn.Parameter(model.norm.weight.detach().clone())
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    assert model.frame_loop is not loop
    loop = model.frame_loop
    with torch.no_grad():
        model.layers[0].attention.wo.weight.mul_(1.0)
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    assert model.frame_loop is not loop


def test_a_changed_setting_gets_a_new_loop(weights, monkeypatch):
    """The kernels read S2CONV_* settings at launch, so graphs captured under one setting are not replayed under
    another (S2CONV_FUSED_SAMPLING would change the tokens a seed gives)."""
    model = _long_model(weights)
    prompt = random_prompt(TINY, 8)
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    loop = model.frame_loop
    monkeypatch.setenv("S2CONV_FUSED_SAMPLING", "0")
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    assert model.frame_loop is not loop
    loop = model.frame_loop
    generate_frames(model, prompt, 4, GREEDY, use_graphs=False)
    assert model.frame_loop is loop


def test_an_outgrown_counter_buffer_stays_alive():
    """Graphs kept with the model hold the split-K counters' address: a bigger buffer for a later launch must not
    free the one they use."""
    import weakref

    from s2conv.runtime.kernels.launch import counters
    dev = torch.device("cpu")
    old = counters(dev, 8)
    ref = weakref.ref(old)
    grown = counters(dev, old.numel() + 1)
    assert grown.numel() > old.numel() and counters(dev, 8) is grown
    del old
    assert ref() is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.8, top_p=0.8, top_k=30)])
def test_cuda_graph_replay_equals_eager(weights, params):
    """Capturing restores the device generator, so graph replay draws what eager steps draw."""
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device="cuda")
    _force_eos_at(model, -1)
    prompt = random_prompt(TINY, 8).cuda()
    eager = generate_frames(model, prompt, 40, params, seed=1, use_graphs=False)
    graphed = generate_frames(model, prompt, 40, params, seed=1, use_graphs=True)
    assert torch.equal(eager, graphed)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.8, top_p=0.8, top_k=30)])
def test_kept_graphs_decode_later_prompts_as_eager_steps_do(weights, monkeypatch, params):
    """Calls with longer prompts replay the spans earlier calls captured (a later call captures only the spans
    no call reached before) and decode exactly what eager steps decode from a fresh model; the same seed again
    samples the same frames, another seed others."""
    from s2conv.runtime import frame_loop
    captures = []
    capture = frame_loop.capture_step
    monkeypatch.setattr(frame_loop, "capture_step", lambda *a: (captures.append(1), capture(*a))[1])
    model = _long_model(weights, "cuda")
    eager_model = _long_model(weights, "cuda")
    prompts = [random_prompt(TINY, t).cuda() for t in (100, 300, 200)]
    got = []
    for i, p in enumerate(prompts):  # spans 256; 512; 256 and 512 again: the third call captures nothing
        before = len(captures)
        got.append(generate_frames(model, p, 150, params, seed=i))
        want = generate_frames(eager_model, p, 150, params, seed=i, use_graphs=False)
        assert torch.equal(got[-1], want), f"call {i}"
        if i == 2:
            assert len(captures) == before
    assert torch.equal(generate_frames(model, prompts[2], 150, params, seed=2), got[2])
    if not params.greedy:
        assert not torch.equal(generate_frames(model, prompts[2], 150, params, seed=9), got[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_graphs_follow_new_temperature_and_top_p(weights, monkeypatch):
    """With the fused sampler, a kept loop's graphs read temperature and top_p from a device tensor: calls that
    change only those reuse the loop without capturing again and decode what eager steps with those settings
    decode; another top_k gets a new loop."""
    from s2conv.runtime import frame_loop
    captures = []
    capture = frame_loop.capture_step
    monkeypatch.setattr(frame_loop, "capture_step", lambda *a: (captures.append(1), capture(*a))[1])
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device="cuda")
    eager_model = DualARTransformer.from_weights(TINY, weights, torch.float32, device="cuda")
    for m in (model, eager_model):
        _force_eos_at(m, -1)
    prompt = random_prompt(TINY, 8).cuda()
    settings = [SamplingParams(temperature=0.8, top_p=0.8, top_k=30), SamplingParams(temperature=1.5, top_p=0.99,
                top_k=30, ras_temperature=0.7, ras_top_p=0.6), SamplingParams(temperature=0.3, top_p=0.5, top_k=30)]
    loop = None
    for i, params in enumerate(settings + settings[:1]):
        got = generate_frames(model, prompt, 40, params, seed=i)
        assert torch.equal(got, generate_frames(eager_model, prompt, 40, params, seed=i, use_graphs=False)), i
        if i == 0:
            loop, captured = model.frame_loop, len(captures)
        assert model.frame_loop is loop and len(captures) == captured, i
    generate_frames(model, prompt, 40, dataclasses.replace(settings[0], top_k=20), seed=0)
    assert model.frame_loop is not loop


def test_progress_callback_counts_every_kept_frame(weights):
    model = DualARTransformer.from_weights(TINY, weights, torch.float32)
    _force_eos_at(model, 5)  # prefill frame + 3 decode frames kept, the 5th main token is <|im_end|>
    prompt = random_prompt(TINY, 8)
    seen, seen_eager = [], []
    codes = generate_frames(model, prompt, 10, GREEDY, use_graphs=False, on_frame=seen.append)
    model2 = DualARTransformer.from_weights(TINY, weights, torch.float32)
    _force_eos_at(model2, 5)
    generate(model2, prompt, 10, GREEDY, on_frame=seen_eager.append)
    assert codes.shape[1] == 4
    assert seen == sorted(seen) and seen[-1] == codes.shape[1]
    assert seen_eager == [1, 2, 3, 4]
