"""Batched decoding of left-padded prompts equals decoding each prompt alone (greedy, float32, CPU)."""
import pytest
import torch

from s2conv.errors import RuntimeModelError
from s2conv.runtime.batch import generate_frames_batch, left_pad, row_mask
from s2conv.runtime.dual_ar import DualARTransformer
from s2conv.runtime.frame_loop import generate_frames
from s2conv.runtime.sampling import SamplingParams
from test_runtime_math import TINY, _force_eos_at, random_prompt, random_s2_weights

GREEDY = SamplingParams(temperature=0)
LENGTHS = (8, 13, 5)


@pytest.fixture(scope="module")
def weights():
    return random_s2_weights(TINY)


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(TINY, t, seed=10 + i) for i, t in enumerate(LENGTHS)]


def _force_eos_rows(model, eos_calls):
    """Row i's main token is <|im_end|> on semantic-logits call eos_calls[i] (call 1 = prefill; -1 = never)."""
    calls = {"n": 0}
    original = model.semantic_logits
    at = torch.tensor(eos_calls)

    def patched(h):
        calls["n"] += 1
        out = original(h).clone()
        out[:, -1] = torch.where(at == calls["n"], 1e4, -1e4).to(out.dtype)
        return out
    model.semantic_logits = patched
    return calls


def _model(weights, eos_calls):
    model = DualARTransformer.from_weights(TINY, weights, torch.float32)
    model.eos_calls = _force_eos_rows(model, eos_calls)
    return model


def _cuda_model(weights):
    """A model on the GPU whose rows never stop (`_force_eos_at`: a Python constant, which graph capture takes)."""
    model = DualARTransformer.from_weights(TINY, weights, torch.float32, device="cuda")
    _force_eos_at(model, -1)
    return model


def test_left_pad_and_row_mask():
    a, b = torch.ones(11, 2, dtype=torch.long), torch.full((11, 4), 2, dtype=torch.long)
    tokens, offsets = left_pad([a, b])
    assert tokens.shape == (2, 11, 4) and offsets.tolist() == [2, 0]
    assert torch.equal(tokens[0, :, 2:], a) and not tokens[0, :, :2].any()
    mask = row_mask(torch.arange(4), offsets, 5)[:, 0]  # [B, S, K]
    expected_row0 = torch.tensor([[1, 0, 0, 0, 0],   # padded queries read only themselves
                                  [0, 1, 0, 0, 0],
                                  [0, 0, 1, 0, 0],
                                  [0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask[0], expected_row0)
    assert torch.equal(mask[1], torch.ones(4, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("eos_calls,max_frames", [
    ((-1, -1, -1), 6),     # no row stops: every row has max_frames frames
    ((3, -1, 5), 9),       # rows stop at different frames, one runs to the limit
    ((1, 4, 2), 9),        # row 0 stops at the prefill frame (0 frames)
    ((2, 2, 2), 1),        # max_frames 1
])
def test_greedy_batch_equals_each_prompt_alone(weights, prompts, eos_calls, max_frames):
    got = generate_frames_batch(_model(weights, eos_calls), prompts, max_frames, GREEDY, use_graphs=False)
    assert len(got) == len(prompts)
    for p, e, codes in zip(prompts, eos_calls, got):
        alone = generate_frames(_model(weights, [e]), p, max_frames, GREEDY, use_graphs=False)
        assert codes.shape == alone.shape
        assert torch.equal(codes, alone)
    stop = [e - 1 if 1 <= e <= max_frames else max_frames for e in eos_calls]  # eos frame is dropped
    assert [c.shape for c in got] == [(TINY.num_codebooks, n) for n in stop]


def test_all_rows_stopped_ends_the_loop(weights, prompts):
    model = _model(weights, (2, 3, 2))
    got = generate_frames_batch(model, prompts, 50, GREEDY, use_graphs=False)
    assert [c.shape[1] for c in got] == [1, 2, 1]
    # prefill, frames up to the last <|im_end|> (call 3), and the one frame in flight while the host checks
    assert model.eos_calls["n"] == 4


def test_sampled_batch_is_seeded_and_caches_recover(weights, prompts):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    model = _model(weights, (-1,))  # one entry: applies to every row
    a = generate_frames_batch(model, prompts, 7, params, seed=3, use_graphs=False)
    b = generate_frames_batch(model, prompts, 7, params, seed=3, use_graphs=False)
    c = generate_frames_batch(model, prompts, 7, params, seed=4, use_graphs=False)
    assert all(x.shape == (10, 7) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # a batch-1 run on the same model afterwards still works (caches are reallocated for one row)
    alone = generate_frames(model, prompts[1], 4, GREEDY, use_graphs=False)
    fresh = generate_frames(_model(weights, [-1]), prompts[1], 4, GREEDY, use_graphs=False)
    assert torch.equal(alone, fresh)


def test_the_batch_loop_is_kept_for_batches_of_as_many_rows(weights, prompts, monkeypatch):
    """A second batch of as many prompts (other lengths: other pad offsets) decodes through the same BatchLoop and
    gives what a fresh model gives; another batch size, other sampling settings (eager on the CPU: all of them
    count), a batch-1 call in between (its caches hold one row) or S2CONV_FRAME_LOOP_CACHE=0 get a new one."""
    model = _model(weights, (-1,))
    other = [random_prompt(TINY, t, seed=30 + i) for i, t in enumerate((4, 9, 11))]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    generate_frames_batch(model, prompts, 6, params, seed=1, use_graphs=False)
    loop = model.batch_loop
    got = generate_frames_batch(model, other, 6, params, seed=2, use_graphs=False)
    assert model.batch_loop is loop
    want = generate_frames_batch(_model(weights, (-1,)), other, 6, params, seed=2, use_graphs=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    generate_frames_batch(model, other[:2], 6, params, use_graphs=False)
    assert model.batch_loop is not loop  # two rows
    loop = model.batch_loop
    generate_frames_batch(model, other[1:], 6, GREEDY, use_graphs=False)
    assert model.batch_loop is not loop  # other settings
    loop = model.batch_loop
    generate_frames(model, prompts[0], 4, GREEDY, use_graphs=False)
    assert model.batch_loop is None  # one-row caches: the batch loop's graphs would read the old ones
    generate_frames_batch(model, other[1:], 6, GREEDY, use_graphs=False)
    loop = model.batch_loop
    monkeypatch.setenv("S2CONV_FRAME_LOOP_CACHE", "0")
    generate_frames_batch(model, other[1:], 6, GREEDY, use_graphs=False)
    assert model.batch_loop is not loop


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_batch_graphs_decode_later_batches_as_eager_steps_do(weights, monkeypatch):
    """On a GPU the kept BatchLoop's graphs serve later batches with other prompt lengths and other (temperature,
    top_p): each batch decodes what eager steps on a fresh model decode, and a batch whose spans were captured
    before captures nothing."""
    from s2conv.runtime import frame_loop
    captures = []
    capture = frame_loop.capture_step
    monkeypatch.setattr("s2conv.runtime.batch.capture_step", lambda *a: (captures.append(1), capture(*a))[1])
    model = _cuda_model(weights)
    batches = [[random_prompt(TINY, t, seed=50 + i + 3 * j).cuda() for i, t in enumerate(lengths)]
               for j, lengths in enumerate([(20, 90, 60), (70, 30, 100), (10, 40, 80)])]
    settings = [SamplingParams(temperature=0.8, top_p=0.8, top_k=30), SamplingParams(temperature=1.3, top_p=0.95,
                top_k=30), SamplingParams(temperature=0.5, top_p=0.6, top_k=30)]
    for j, (batch, params) in enumerate(zip(batches, settings)):
        got = generate_frames_batch(model, batch, 40, params, seed=j)
        want = generate_frames_batch(_cuda_model(weights), batch, 40, params, seed=j, use_graphs=False)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), j
        if j == 0:
            loop, captured = model.batch_loop, len(captures)
        assert model.batch_loop is loop and len(captures) == captured, j


def test_batch_rejects_bad_input(weights, prompts):
    model = _model(weights, (-1,))
    with pytest.raises(RuntimeModelError, match="max_seq_len"):
        generate_frames_batch(model, prompts, TINY.max_seq_len, GREEDY)
    with pytest.raises(RuntimeModelError, match="prompt 1 shape"):
        generate_frames_batch(model, [prompts[0], prompts[0][:5]], 4, GREEDY)
    with pytest.raises(RuntimeModelError, match="at least one prompt"):
        generate_frames_batch(model, [], 4, GREEDY)


@pytest.fixture(scope="module")
def tts(tiny_checkpoint, tmp_path_factory):
    from s2conv.converter import Policy, export_gguf
    from s2conv.runtime import pipeline

    path = tmp_path_factory.mktemp("batch") / "bf16.gguf"
    export_gguf(tiny_checkpoint, path, Policy.from_options(type="bf16"), tokenizer_json=False)
    return pipeline.load(path, device="cpu")


def test_pipeline_batch_matches_single_texts(tts):
    texts = ["Hello world.", "A somewhat longer sentence, to pad the other one."]
    params = SamplingParams(temperature=0, top_k=1)
    got = tts.generate_codes_batch(texts, params=params, max_frames=10)
    for text, codes in zip(texts, got):
        assert torch.equal(codes, tts.generate_codes(text, params=params, max_frames=10))
    wavs = tts.synthesize_batch(texts, max_frames=6, seed=2)
    frame = tts.loaded.codec.cc.frame_length
    assert len(wavs) == 2 and all(w.dtype == torch.float32 and 0 < w.numel() <= 6 * frame for w in wavs)
    with pytest.raises(RuntimeModelError, match="text 1 splits into 2 turn batches"):
        tts.generate_codes_batch(["Hi.", "<|speaker:0|>" + "a" * 400 + "<|speaker:1|>" + "b" * 400])


def test_over_long_prompts_are_one_error_in_both_paths(tts):
    """A reference of more frames than the prompt limit (max_seq_len - PROMPT_RESERVE) leaves no room: refused
    before any decoding, by the single-text and the batched path alike."""
    from s2conv.runtime.pipeline import PROMPT_RESERVE, Reference

    limit = tts.cfg.max_seq_len - PROMPT_RESERVE
    ref = Reference("a long reference", torch.zeros(tts.cfg.num_codebooks, limit + 1, dtype=torch.long))
    with pytest.raises(RuntimeModelError, match=f"exceeds the model's limit of {limit}: shorten the text or the ref"):
        tts.generate_codes("Hi.", [ref], max_frames=2)
    with pytest.raises(RuntimeModelError, match=f"exceeds the model's limit of {limit}: shorten text 0"):
        tts.generate_codes_batch(["Hi."], [ref], max_frames=2)
