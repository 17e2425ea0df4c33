"""`s2conv export` on the tiny synthetic checkpoint: file validity, values, metadata, plan == file, determinism."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize

from oracle import ggml  # noqa: F401  (fixture: llama.cpp's C GGUF loader)
from s2conv.checkpoint import make_checkpoint, open_checkpoint
from s2conv.codec_schema import fold_weight_norm, is_transposed_conv
from s2conv.converter.export import export_gguf, plan_export
from s2conv.converter.policy import S2_TYPES, TYPE_CHOICES, Policy
from s2conv.converter.unpack import dequantize_tensor
from s2conv.quant_formats import list_formats
from s2conv.schema import KEY_POLICY, KEY_SOURCE_HASH, KEY_TENSOR_FORMAT, KEY_TENSOR_SHAPE

# relative RMS error (vs the row's RMS) a format may show on the synthetic weights
MAX_REL_ERR = {"f32": 0.0, "bf16": 0.0, "f16": 1e-3, "q8_0": 0.02, "q8": 0.04, "fp8": 0.08, "q6_k": 0.04,
               "q5_k": 0.07, "q5_0": 0.07, "q5_1": 0.07, "q4_k": 0.15, "q4_0": 0.15, "q4": 0.3, "q3_k": 0.3,
               "q3": 0.5, "q2_k": 0.6, "q2": 0.9}
AVAILABLE = [t for t in TYPE_CHOICES if t not in S2_TYPES or t in list_formats()]
FAST_SLOW_TARGET = ("bf16", "q4_k_m", "q4", "q8")  # also exported with --target slow in the default run


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def ckpt(tiny):
    return open_checkpoint(tiny)


@pytest.fixture(scope="session")
def exported(tiny, ckpt, tmp_path_factory):
    """(type, target, compat) -> (path, plan), exported once per session."""
    cache = {}
    root = tmp_path_factory.mktemp("gguf")

    def get(type_: str, target: str = "all", compat: bool = False):
        key = (type_, target, compat)
        if key not in cache:
            out = root / f"{type_}-{target}{'-compat' if compat else ''}.gguf"
            r = export_gguf(tiny, out, Policy(type=type_, target=target, compat=compat), ckpt=ckpt,
                            tokenizer_json=False)
            cache[key] = (out, r.plan)
        return cache[key]

    return get


def _targets():
    out = []
    for t in AVAILABLE:
        out.append(pytest.param(t, "all", id=f"{t}-all"))
        marks = () if t in FAST_SLOW_TARGET else (pytest.mark.slow,)
        out.append(pytest.param(t, "slow", id=f"{t}-slow", marks=marks))
    return out


def _source(ckpt, row) -> torch.Tensor:
    if row.kind == "model":
        return ckpt.model_tensor(row.sources[0]).float()
    if row.kind == "codec":
        return ckpt.codec_tensor(row.sources[0]).float()
    g, v = (ckpt.codec_tensor(n) for n in row.sources)
    return fold_weight_norm(g, v, transposed=is_transposed_conv(row.sources[1]))


@pytest.mark.parametrize("type_,target", _targets())
def test_export_matches_plan_and_source(exported, ckpt, type_, target):
    path, plan = exported(type_, target)
    reader = GGUFReader(path)
    assert path.stat().st_size == plan.file_bytes
    assert [t.name for t in reader.tensors] == [r.name for r in plan.rows]
    quantized = 0
    for t, row in zip(reader.tensors, plan.rows):
        assert t.tensor_type.name == row.ggml_type, row.name
        assert tuple(int(x) for x in reversed(t.shape)) == row.stored_shape, row.name
        assert int(t.n_bytes) == row.nbytes, row.name
        if row.component == "codec" and type_ != "bf16":
            continue  # the codec is f16 in every export: its values are checked once, in the bf16 case
        src = _source(ckpt, row)
        got = dequantize_tensor(reader, t)
        assert got.shape == src.shape, row.name
        if row.format in ("bf16", "f32") and row.source_dtype in ("bf16", row.format):
            assert torch.equal(got, src), f"{row.name} stored as {row.format} must be exact"
            continue
        rel = float((got - src).pow(2).mean().sqrt() / src.pow(2).mean().sqrt().clamp_min(1e-12))
        assert rel <= MAX_REL_ERR[row.format], f"{row.name} ({row.format}): relative error {rel:.4f}"
        if t.tensor_type not in (GGMLQuantizationType.I8, GGMLQuantizationType.F16, GGMLQuantizationType.F32):
            # an independent decoder (gguf-py) must read the same values from the stored bytes
            ref = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
            np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32), err_msg=row.name)
        quantized += row.format not in ("f32", "f16", "bf16")
    policy = json.loads(str(reader.fields[KEY_POLICY].contents()))
    assert policy["type"] == type_ and policy["target"] == target
    if type_ not in ("f32", "f16", "bf16"):
        assert quantized > 0


def test_quantized_tensors_follow_target(exported):
    _, plan_slow = exported("q4_k_m", "slow")
    _, plan_all = exported("q4_k_m", "all")
    by = lambda plan, comp: {r.format for r in plan.rows  # noqa: E731
                             if r.component == comp and len(r.shape) == 2 and r.name != "fast_output.weight"}
    assert by(plan_slow, "fast_ar") == {"bf16"}
    assert by(plan_all, "fast_ar") <= {"q4_k", "q6_k"}
    assert by(plan_all, "embeddings") == {"bf16"}
    assert {r.format for r in plan_all.rows if r.component == "codec"} == {"f16"}
    assert {r.format for r in plan_all.rows if r.name.endswith("norm.weight") and r.component != "codec"} == {"f32"}


@pytest.mark.oracle
@pytest.mark.parametrize("type_", ["bf16", "q4_k_m", "q2_k"] + [t for t in ("q4", "fp8") if t in AVAILABLE])
def test_c_loader_accepts_the_file(exported, ggml, type_):
    path, plan = exported(type_)
    ok, info = ggml.gguf_open(path, read_data=True)
    assert ok, info
    reader = GGUFReader(path)
    assert [t.name for t in info.tensors] == [r.name for r in plan.rows]
    assert [t.type.name for t in info.tensors] == [r.ggml_type for r in plan.rows]
    assert [t.offset for t in info.tensors] == [int(t.data_offset) - reader.data_offset for t in reader.tensors]
    assert [t.size for t in info.tensors] == [r.nbytes for r in plan.rows]


def _kv(reader, key):
    f = reader.fields[key]
    return [GGUFValueType(x) for x in f.types], f.contents()


def test_metadata_types_and_values_for_s2cpp(exported, ckpt):
    path, _ = exported("q4_k_m")
    reader = GGUFReader(path)
    cfg, cc = ckpt.config, ckpt.codec_config
    U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
    expect = {
        "general.architecture": (STR, "fish-speech"), "general.quantization_version": (U32, 2),
        "general.file_type": (U32, 15),
        "fish-speech.block_count": (U32, cfg.n_layer), "fish-speech.embedding_length": (U32, cfg.dim),
        "fish-speech.attention.head_count": (U32, cfg.n_head),
        "fish-speech.attention.head_count_kv": (U32, cfg.n_local_heads),
        "fish-speech.vocab_size": (U32, cfg.vocab_size), "fish-speech.context_length": (U32, cfg.max_seq_len),
        "fish-speech.feed_forward_length": (U32, cfg.intermediate_size),
        "fish-speech.rope.freq_base": (F32, cfg.rope_base),
        "fish_speech.codebook_size": (U32, cfg.codebook_size), "fish_speech.num_codebooks": (U32, 10),
        "fish_speech.semantic_begin_id": (U32, cfg.semantic_begin_id),
        "fish_speech.semantic_end_id": (U32, cfg.semantic_end_id),
        "fish_speech.attention_qk_norm": (BOOL, True), "fish_speech.scale_codebook_embeddings": (BOOL, True),
        "fish_speech.tie_word_embeddings": (BOOL, True), "fish_speech.fast_block_count": (U32, cfg.n_fast_layer),
        "fish_speech.fast_head_dim": (U32, cfg.fast_head_dim), "fish_speech.fast_project_in": (BOOL, False),
        "fish_speech.fast_rope_freq_base": (F32, cfg.rope_base),
        "fish_speech.codec.sample_rate": (U32, 44100), "fish_speech.codec.hop_length": (U32, cc.hop_length),
        "fish_speech.codec.frame_length": (U32, cc.frame_length),
        "fish_speech.codec.latent_dim": (U32, cc.latent_dim), "fish_speech.codec.encoder_dim": (U32, cc.encoder_dim),
        "fish_speech.codec.quantizer_residual_codebook_size": (U32, cc.residual_codebook_size),
        "fish_speech.codec.quantizer_semantic_codebook_size": (U32, cc.semantic_codebook_size),
        "fish_speech.codec.rvq_transformer.n_layer": (U32, cc.rvq_n_layer),
        "fish_speech.codec.transformer.layer_norm_rms_eps": (F32, cc.norm_eps),
        "tokenizer.ggml.model": (STR, "gpt2"), "tokenizer.ggml.pre": (STR, "qwen2"),
        "tokenizer.ggml.eos_token_id": (U32, cfg.eos_token_id),
    }
    for key, (typ, value) in expect.items():
        types, got = _kv(reader, key)
        assert types == [typ], key
        assert got == pytest.approx(value) if typ == F32 else got == value, key
    for key in ("encoder_rates", "decoder_rates", "encoder_transformer_layers", "quantizer_downsample_factor"):
        types, got = _kv(reader, "fish_speech.codec." + key)
        assert types == [GGUFValueType.ARRAY, GGUFValueType.INT32], key
        assert tuple(got) == tuple(getattr(cc, key.replace("quantizer_downsample_factor", "downsample_factor")))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[cfg.eos_token_id] == "<|im_end|>"
    assert tokens[cfg.semantic_begin_id] == "<|semantic:0|>"
    assert reader.fields[KEY_SOURCE_HASH].contents() == ckpt.content_hash()


def test_private_formats_carry_decoder_keys(exported):
    fmt = next((t for t in ("q4", "q8", "fp8") if t in AVAILABLE), None)
    if fmt is None:
        pytest.skip("s2conv's own formats are not registered yet")
    path, plan = exported(fmt)
    reader = GGUFReader(path)
    private = [r for r in plan.rows if r.is_private]
    assert private and all(r.ggml_type == "I8" for r in private)
    for r in private:
        assert reader.fields[KEY_TENSOR_FORMAT.format(name=r.name)].contents() == r.stored
        assert tuple(reader.fields[KEY_TENSOR_SHAPE.format(name=r.name)].contents()) == r.shape


@pytest.mark.parametrize("fmt,ggml", [("q4", "Q4_0"), ("q8", "Q8_0")])
def test_compat_stores_exact_ggml_types(exported, ckpt, fmt, ggml):
    if fmt not in AVAILABLE:
        pytest.skip(f"format {fmt} not registered yet")
    pytest.importorskip("s2conv.quant_formats.compat")
    path_c, plan_c = exported(fmt, compat=True)
    path_p, _ = exported(fmt)
    rc, rp = GGUFReader(path_c), GGUFReader(path_p)
    tp = {t.name: t for t in rp.tensors}
    n = 0
    for t, row in zip(rc.tensors, plan_c.rows):
        if row.format != fmt:
            continue
        assert t.tensor_type.name == ggml
        torch.testing.assert_close(dequantize_tensor(rc, t), dequantize_tensor(rp, tp[t.name]), rtol=1e-3, atol=1e-6)
        n += 1
    assert n > 0


def test_deterministic_across_threads(tiny, ckpt, tmp_path):
    outs = []
    for i, threads in enumerate((1, 2, 2)):
        out = tmp_path / f"d{i}.gguf"
        export_gguf(tiny, out, Policy(type="q4_k_m", target="all"), ckpt=ckpt, threads=threads, tokenizer_json=False)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `s2conv ARGS` in-process through main() (exit code, stdout, stderr)."""
    from s2conv.cli import main

    monkeypatch.setattr(sys, "argv", ["s2conv", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_dry_run_lists_the_written_file(tiny, exported, monkeypatch, capsys):
    path, plan = exported("q4_k_m", "all")
    code, out, err = _cli(monkeypatch, capsys, "export", tiny, "--type", "q4_k_m", "--target", "all", "--dry-run")
    assert code == 0, err
    assert f"file: {path.stat().st_size:,} bytes" in out
    listed = [line.split()[0] for line in out.splitlines()[1:len(plan.rows) + 1]]
    assert listed == [row.name for row in plan.rows]


def test_cli_export_writes_tokenizer_and_refuses_overwrite(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.gguf"
    code, stdout, err = _cli(monkeypatch, capsys, "export", tiny, "--type", "q8_0", "-o", out, "--quiet")
    assert code == 0, err
    assert "total" in stdout and "wrote" in stdout
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    before = out.read_bytes()
    code, _, err = _cli(monkeypatch, capsys, "export", tiny, "--type", "q4_0", "-o", out, "--quiet")
    assert code == 1 and err.count("\n") == 1 and "--force" in err
    assert out.read_bytes() == before
    code, _, err = _cli(monkeypatch, capsys, "export", tiny, "--type", "q4_0", "-o", out, "--quiet", "--force")
    assert code == 0, err
    assert out.read_bytes() != before
    assert GGUFReader(out).fields["general.file_type"].contents() == 2
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["bad checkpoint", "unknown type", "missing dir", "unwritable", "no output"])
def test_cli_errors_are_one_line(tiny, tmp_path, monkeypatch, capsys, case):
    out = tmp_path / "x.gguf"
    args = {"bad checkpoint": ("export", tmp_path, "-o", out),
            "unknown type": ("export", tiny, "--type", "q9_k", "-o", out),
            "missing dir": ("export", tiny, "-o", tmp_path / "nope" / "x.gguf"),
            "unwritable": ("export", tiny, "-o", "/proc/x.gguf"),
            "no output": ("export", tiny)}[case]
    code, _, err = _cli(monkeypatch, capsys, *args)
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if "s2conv-tmp" in p.name or p.name.startswith(".")]


def test_full_disk_leaves_nothing(tiny, ckpt, tmp_path, monkeypatch):
    import errno

    from s2conv.converter import export as export_mod
    from s2conv.errors import ConversionError

    calls = {"n": 0}
    real = export_mod._write

    def failing(f, buf):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, buf)

    monkeypatch.setattr(export_mod, "_write", failing)
    out = tmp_path / "full.gguf"
    with pytest.raises(ConversionError, match="disk full") as e:
        export_gguf(tiny, out, Policy(type="q8_0"), ckpt=ckpt)
    assert "\n" not in str(e.value)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert not (tmp_path / "tokenizer.json").exists()


def test_interrupt_in_process_leaves_nothing(tiny, ckpt, tmp_path, monkeypatch):
    from s2conv.converter import export as export_mod

    def interrupted(f, buf):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_write", interrupted)
    out = tmp_path / "int.gguf"
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny, out, Policy(type="q8_0"), ckpt=ckpt)
    assert list(tmp_path.iterdir()) == []


def _writing(pid: int, d: Path) -> bool:
    """True once process `pid` holds an open file in directory d (the anonymous export file)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith(str(d)) for link in links)


@pytest.mark.parametrize("sig,extra", [("TERM", 0.0), ("KILL", 0.05), ("TERM", 0.3), ("KILL", 0.6)])
def test_killed_export_leaves_no_partial_file(tiny, tmp_path, sig, extra):
    """Signal a CLI export while it writes (once its output file is open, plus `extra` seconds)."""
    import signal
    import time

    out = tmp_path / "k.gguf"
    p = subprocess.Popen([sys.executable, "-m", "s2conv", "export", str(tiny), "--type", "q4_k_m", "--target",
                          "all", "-o", str(out), "--quiet", "--no-tokenizer-json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while p.poll() is None and not _writing(p.pid, tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(extra)
    was_running = p.poll() is None
    p.send_signal(getattr(signal, "SIG" + sig))
    _, err = p.communicate(timeout=60)
    assert _leftovers(tmp_path) == []
    if out.exists():  # the export finished before the signal: the file must be complete
        assert len(GGUFReader(out).tensors) > 300
    else:
        assert was_running and list(tmp_path.iterdir()) == []
        if sig == "TERM":
            assert p.returncode == 130 and err.decode().strip() == "error: interrupted"


def test_plan_without_writing_reads_no_tensor_data(ckpt, tiny):
    class NoData:
        def __getattr__(self, name):
            if name in ("model_tensor",):
                raise AssertionError("plan must not read model tensors")
            return getattr(ckpt, name)

    plan = plan_export(NoData(), Policy(type="q4_k_m"), tiny)
    assert len(plan.rows) == len(ckpt.model_names()) + len([n for n in ckpt.codec_names()
                                                             if not n.endswith(("original0", "weight_g"))])
    assert math.isclose(plan.summary["embeddings"]["bpw"], 16.0)


def test_sizes_table_for_real_s2_pro_shapes():
    from s2conv.converter.sizes import size_table

    from s2conv.codec_schema import folded_codec_tensor_shapes
    from s2conv.schema import CodecConfig

    t = size_table()
    folded = sum(math.prod(s) for s in folded_codec_tensor_shapes(CodecConfig()).values())  # g tensors folded away
    assert t["model"]["params"] == 4_561_852_416 + folded
    bf16 = t["types"]["bf16"]["slow"]
    assert bf16["slow_ar"]["params"] + bf16["embeddings"]["params"] + bf16["fast_ar"]["params"] == 4_561_852_416
    assert bf16["codec"]["bytes"] == 2 * folded  # f16 codec
    q80 = t["types"]["q8_0"]["all"]
    assert q80["slow_ar"]["bpw"] == pytest.approx(8.5, abs=0.01)  # norms add ~0.001
    assert t["types"]["q4_k_m"]["slow"]["total"]["bytes"] < t["types"]["q8_0"]["slow"]["total"]["bytes"]
