"""GGUF -> runtime: the loader rebuilds the exported model exactly, decodes like the source checkpoint, and the
synthesis pipeline / `s2conv synth` produce audio or one-line errors."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from kernel_device import kernel_device
from s2conv.checkpoint import open_checkpoint
from s2conv.codec_schema import fold_weight_norm, is_transposed_conv, weight_norm_pairs
from s2conv.converter import Policy, export_gguf
from s2conv.errors import RuntimeModelError, S2ConvError, SchemaError
from s2conv.runtime import pipeline, prompt
from s2conv.runtime.dual_ar import DualARTransformer, generate
from s2conv.runtime.loader import load_model
from s2conv.runtime.qlinear import QuantLinear
from s2conv.runtime.sampling import SamplingParams
from s2conv.schema import hf_to_model_name

GREEDY = SamplingParams(temperature=0, top_k=1)


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    files = {}
    for name, opts in {"bf16": dict(type="bf16"), "q4": dict(type="q4"), "q8_0": dict(type="q8_0", target="all")}.items():
        files[name] = out / f"{name}.gguf"
        export_gguf(tiny_checkpoint, files[name], Policy.from_options(**opts), tokenizer_json=False)
    return files


@pytest.fixture(scope="module")
def source_model(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    weights = {n: ckpt.model_tensor(n) for n in ckpt.model_names()}
    return ckpt, DualARTransformer.from_weights(ckpt.config, weights, dtype=torch.bfloat16)


def _prompt(loaded, text="Hello there, how are you?"):
    cfg = loaded.config
    parts = prompt.generation_prompt([prompt.system_message()], text)
    return prompt.encode_parts(loaded.tokenizer, parts, semantic_begin_id=cfg.semantic_begin_id,
                               num_codebooks=cfg.num_codebooks)


def test_bf16_gguf_loads_the_exact_source_weights(exports, source_model):
    ckpt, model = source_model
    loaded = load_model(exports["bf16"])
    assert loaded.config == ckpt.config
    ours, theirs = loaded.model.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    # the codec: folded weight norm of the checkpoint, stored as f16
    pairs = weight_norm_pairs(ckpt.codec_names())
    codec = loaded.codec.state_dict()
    for folded, (g, v) in list(pairs.items())[:8]:
        ref = fold_weight_norm(ckpt.codec_tensor(g).float(), ckpt.codec_tensor(v).float(), is_transposed_conv(folded))
        assert torch.allclose(codec[folded], ref.half().float(), rtol=0, atol=0), folded


def test_greedy_codes_from_gguf_equal_the_source_checkpoint(exports, source_model):
    _, model = source_model
    loaded = load_model(exports["bf16"])
    tokens = _prompt(loaded)
    a = generate(loaded.model, tokens, 24, GREEDY)
    b = generate(model, tokens, 24, GREEDY)
    assert a.shape[0] == 10 and a.shape[1] > 0
    assert torch.equal(a, b)


def _semantic_logits(model, tokens):
    with torch.inference_mode():
        model.setup_caches(1, tokens.shape[-1])
        return model.prefill(tokens)[1].float()


def test_quantized_file_keeps_weights_packed_and_computes_with_them(exports, source_model):
    from s2conv.gguf_io import GGUFFile

    _, source = source_model
    loaded = load_model(exports["q4"])
    qlinears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    cfg = loaded.config
    assert len(qlinears) == 5 * cfg.n_layer  # slow AR only (default target)
    assert all(m.weight.dtype == torch.uint8 and m.fmt.name == "q4" for m in qlinears)
    assert not any(isinstance(m, QuantLinear) for m in loaded.model.fast_layers.modules())
    # the packed model computes exactly what a plain model with the decoded weights computes
    f = GGUFFile(exports["q4"])
    decoded = DualARTransformer.from_weights(cfg, {n: f.dequantize(n) for n in source.state_dict()}, torch.bfloat16)
    tokens = _prompt(loaded)[None]
    got = _semantic_logits(loaded.model, tokens)
    assert torch.equal(got, _semantic_logits(decoded, tokens))
    # and it is further from the source than an 8-bit file is
    ref = _semantic_logits(source, tokens)
    q8 = _semantic_logits(load_model(exports["q8_0"]).model, tokens)
    err = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    assert 0 < err(q8) < err(got)


def _prepared_q4_model(exports):
    """A q4 file loaded in fp32 (greedy codes must not hinge on bf16 rounding ties), its greedy codes from the
    storage bytes, and its QuantLinears after what `load_model` does on CUDA: prepare_kernel (kernel layout in,
    storage bytes out), forced on CPU where the kernels run in triton's interpreter."""
    kernel_device()
    loaded = load_model(exports["q4"], dtype=torch.float32)
    tokens = _prompt(loaded)
    want = generate(loaded.model, tokens, 4, GREEDY)
    qlinears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert qlinears and all(m.prepare_kernel(force=True) for m in qlinears)
    assert all(m.weight.numel() == 0 for m in qlinears)
    return loaded, tokens, want, qlinears


def test_prepared_model_frees_the_storage_bytes_and_generates_the_same_codes(exports):
    loaded, tokens, want, qlinears = _prepared_q4_model(exports)
    for m in qlinears:
        m._kernel_on_cpu = False  # CPU inputs take the reference path, which now decodes the kernel layout
    assert torch.equal(generate(loaded.model, tokens, 4, GREEDY), want)


@pytest.mark.slow  # ~70 s: every linear of every step in triton's interpreter
def test_prepared_model_generates_the_same_codes_through_the_kernels(exports):
    loaded, tokens, want, _ = _prepared_q4_model(exports)
    assert torch.equal(generate(loaded.model, tokens, 4, GREEDY), want)


def test_target_all_quantizes_the_fast_ar_too(exports):
    loaded = load_model(exports["q8_0"])
    fast = [m for m in loaded.model.fast_layers.modules() if isinstance(m, QuantLinear)]
    assert len(fast) == 5 * loaded.config.n_fast_layer and fast[0].fmt.name == "q8_0"


def test_seeded_sampling_is_reproducible_and_seed_dependent(exports):
    tts = pipeline.load(exports["bf16"], device="cpu")
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=30)
    a = tts.generate_codes("Hello world.", seed=1, params=params, max_frames=12)
    b = tts.generate_codes("Hello world.", seed=1, params=params, max_frames=12)
    c = tts.generate_codes("Hello world.", seed=2, params=params, max_frames=12)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_voice_cloning_and_multi_turn_text(exports, tmp_path):
    tts = pipeline.load(exports["bf16"], device="cpu")
    ref_codes = tts.generate_codes("A reference voice.", seed=3, max_frames=8)
    sf.write(tmp_path / "ref.wav", tts.decode(ref_codes).numpy(), 22050)  # another rate: resampled on load
    ref = tts.encode_reference(tmp_path / "ref.wav", "A reference voice.")
    assert ref.codes.shape[0] == 10 and ref.codes.shape[1] >= ref_codes.shape[1] // 2
    codes = tts.generate_codes("<|speaker:0|>First turn.<|speaker:1|>Second turn.", [ref], seed=0,
                               params=GREEDY, max_frames=6)
    assert codes.shape[0] == 10 and 0 < codes.shape[1] <= 6 * 2  # at most max_frames per text batch
    wav = tts.decode(codes)
    assert wav.shape == (codes.shape[1] * tts.loaded.codec.cc.frame_length,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text="   \n"), "empty"),
    (dict(text="\x00\x01"), "empty"),
    (dict(text="hi", max_frames=0), "max-frames"),
    (dict(text="hi", temperature=-1), "temperature"),
    (dict(text="hi", top_p=1.5), "top_p"),
])
def test_bad_synthesis_input_is_refused(exports, kwargs, message):
    tts = pipeline.load(exports["bf16"], device="cpu")
    kwargs.setdefault("max_frames", 4)
    with pytest.raises(RuntimeModelError, match=message):
        tts.synthesize(**kwargs)


def test_reference_shorter_than_a_frame_or_silent_is_refused(exports, tmp_path):
    tts = pipeline.load(exports["bf16"], device="cpu")
    sf.write(tmp_path / "short.wav", np.full(100, 0.1, dtype=np.float32), 44100)
    sf.write(tmp_path / "silent.wav", np.zeros(44100, dtype=np.float32), 44100)
    with pytest.raises(RuntimeModelError, match="shorter than one frame"):
        tts.encode_reference(tmp_path / "short.wav", "words")
    with pytest.raises(RuntimeModelError, match="silent"):
        tts.encode_reference(tmp_path / "silent.wav", "words")


def test_loader_rejects_files_that_are_not_s2_models(exports, tmp_path):
    import gguf
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(SchemaError, match="not an S2 Pro model"):
        load_model(tmp_path / "llama.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(S2ConvError):
        load_model(tmp_path / "junk.gguf")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "s2conv", *map(str, args)], capture_output=True, text=True)


def test_synth_cli_writes_a_wav(exports, tmp_path):
    out = tmp_path / "hello.wav"
    r = _run("synth", exports["bf16"], "--text", "Hello.", "-o", out, "--max-frames", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    data, sr = sf.read(out)
    frame = load_model(exports["bf16"]).codec.cc.frame_length
    assert sr == 44100 and len(data) > 0 and len(data) % frame == 0


@pytest.mark.parametrize("extra, message", [
    (["--text", ""], "empty"),
    (["--text", "hi", "--ref", "/nonexistent.wav", "--ref-text", "x"], "no such file"),
    (["--text", "hi", "--top-p", "0"], "top_p"),
])
def test_synth_cli_errors_are_one_line_and_write_nothing(exports, tmp_path, extra, message):
    out = tmp_path / "x.wav"
    r = _run("synth", exports["bf16"], "-o", out, "--device", "cpu", *extra)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_synth_cli_on_a_missing_model_is_one_line(tmp_path):
    r = _run("synth", tmp_path / "missing.gguf", "--text", "hi", "-o", tmp_path / "x.wav")
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key, value", [("fish-speech.attention.layer_norm_rms_epsilon", float("nan")),
                                        ("fish-speech.rope.freq_base", -1.0)])
def test_loader_refuses_nonsense_float_hyper_parameters(exports, tmp_path, key, value):
    import struct

    data = bytearray(exports["bf16"].read_bytes())
    at = data.index(key.encode()) + len(key)  # the key string, then its uint32 value type, then the float32
    assert struct.unpack_from("<I", data, at)[0] == 6  # GGUF FLOAT32
    struct.pack_into("<f", data, at + 4, value)
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(SchemaError, match="expected a finite positive number"):
        load_model(tmp_path / "bad.gguf")
