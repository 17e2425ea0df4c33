"""s2conv verify: metric functions on signals with known answers, and verify on tiny exports."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from s2conv.converter import Policy, export_gguf
from s2conv.errors import S2ConvError
from s2conv.gguf_io import GGUFFile
from s2conv.verify import (
    THRESHOLDS, VerifyFailed, VerifyOptions, compare_audio, compare_codes, compare_logits, compare_tensors,
    reference_outputs, verify_gguf,
)
from s2conv.verify.metrics import log_mel, mel_distance, mel_filterbank
from s2conv.verify.probe import ProbeSettings
from s2conv.verify.report import MATPLOTLIB_MISSING, jsonable, plot_layer_heatmap, plot_size_vs_error

# ---------------------------------------------------------------------------------------------------------------
# Metrics with known answers
# ---------------------------------------------------------------------------------------------------------------


def test_compare_tensors_scaled_signal():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 128, generator=g, dtype=torch.float64)
    e = compare_tensors(ref, 1.1 * ref)  # error = 0.1 ref
    assert e.rel_rmse == pytest.approx(0.1, rel=1e-9)
    assert e.snr_db == pytest.approx(20.0, rel=1e-9)
    assert e.cosine == pytest.approx(1.0, abs=1e-12)
    assert e.max_abs == pytest.approx(0.1 * float(ref.abs().max()), rel=1e-6)
    assert not e.exact
    assert e.worst_row == int(ref.square().sum(1).argmax())


def test_compare_tensors_exact_and_worst_row():
    ref = torch.arange(12.0).reshape(3, 4)
    e = compare_tensors(ref, ref.clone().to(torch.bfloat16))  # small integers are exact in bf16
    assert e.exact and e.rel_rmse == 0 and e.snr_db == math.inf and e.worst_row == -1
    deq = ref.clone()
    deq[1, 2] += 0.5
    e = compare_tensors(ref, deq)
    assert e.worst_row == 1 and e.max_abs == 0.5 and not e.exact
    assert compare_tensors(ref, -ref).cosine == pytest.approx(-1.0)


def test_compare_tensors_nan_is_not_exact():
    ref = torch.ones(4)
    e = compare_tensors(ref, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    assert not e.exact and e.rel_rmse == math.inf


def test_compare_logits_identical_and_known_kl():
    logits = torch.randn(50, 17, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 17, (50,))
    s = compare_logits(logits, logits.clone(), targets)
    assert s.kl_mean == 0 and s.kl_max == 0 and s.top1 == 1 and s.dp_abs_mean == 0 and s.ppl_ratio == 1
    # two tokens: P = (0.5, 0.5), Q = (0.8, 0.2) -> KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.log(torch.tensor([[0.8, 0.2]], dtype=torch.float64))
    s = compare_logits(p, q, torch.tensor([1]))
    assert s.kl_mean == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2), rel=1e-9)
    assert s.dp_abs_mean == pytest.approx(0.3, rel=1e-9)  # reference token 1: 0.5 -> 0.2
    assert s.ppl_ratio == pytest.approx(0.5 / 0.2, rel=1e-9)
    assert s.top1 == 1.0  # both argmax 0 (a tie goes to the first index)


def test_compare_logits_top1_and_percentile():
    ref = torch.zeros(100, 3)
    ref[:, 0] = 5.0
    test = ref.clone()
    test[:10, 1] = 10.0  # 10 of 100 positions change their argmax
    s = compare_logits(ref, test, torch.zeros(100, dtype=torch.long))
    assert s.top1 == pytest.approx(0.9)
    assert s.kl_p99 > s.kl_mean > 0 and s.kl_max >= s.kl_p99
    with pytest.raises(S2ConvError):
        compare_logits(ref, test[:, :2], torch.zeros(100, dtype=torch.long))


def test_compare_audio_known_answers():
    sr = 16000
    t = torch.arange(sr) / sr
    wav = 0.5 * torch.sin(2 * math.pi * 440 * t)
    same = compare_audio(wav, wav.clone(), sr)
    assert same.snr_db == math.inf and same.mel_distance == 0 and same.max_abs == 0
    half = compare_audio(wav, 0.5 * wav, sr)
    assert half.snr_db == pytest.approx(10 * math.log10(4), rel=1e-9)  # error = half the signal
    assert half.si_sdr_db == math.inf  # a pure rescale is perfect for SI-SDR
    # log-mel of a rescale by 1/2 shifts every (non-floored) bin by ln 2
    assert 0.5 * math.log(2) < half.mel_distance <= math.log(2) + 1e-9
    noisy = compare_audio(wav, wav + 0.05 * torch.randn(sr, generator=torch.Generator().manual_seed(0)), sr)
    assert 10 < noisy.snr_db < 30 and noisy.mel_distance > 0


def test_mel_filterbank_shape_and_peaks():
    fb = mel_filterbank(1024, 40, 44100)
    assert fb.shape == (40, 513)
    assert fb.min() >= 0 and fb.max() <= 1 + 1e-12
    assert (fb.max(dim=1).values > 0.3).all()  # every filter covers at least one bin
    assert log_mel(torch.zeros(4096), 44100, 1024).max() == pytest.approx(math.log(1e-5))
    assert mel_distance(torch.zeros(100), torch.zeros(100), 44100) == 0  # shorter than n_fft: padded


def test_compare_codes():
    ref = torch.zeros(10, 8, dtype=torch.long)
    codes = ref.clone()
    codes[3, 5] = 1
    m = compare_codes(ref, codes)
    assert m.frame_match == pytest.approx(7 / 8) and m.code_match == pytest.approx(79 / 80) and m.first_diff == 5
    shorter = compare_codes(ref, ref[:, :4])
    assert shorter.frame_match == 0.5 and shorter.first_diff == 4
    assert compare_codes(ref, ref).first_diff == -1


def test_thresholds_order_the_integer_formats():
    limits = [THRESHOLDS[f].max_rel_rmse for f in ("q8", "q4", "q3", "q2")]
    assert limits == sorted(limits)
    assert THRESHOLDS["f32"].max_rel_rmse == 0


def test_jsonable_non_finite():
    assert json.dumps(jsonable({"a": math.inf, "b": [-math.inf, math.nan, 1.5]}), allow_nan=False) == \
        '{"a": "inf", "b": ["-inf", "nan", 1.5]}'


# ---------------------------------------------------------------------------------------------------------------
# Verify on tiny exports
# ---------------------------------------------------------------------------------------------------------------

FAST_PROBE = ProbeSettings(frames=12, reference_frames=6, greedy_frames=8)
OPTIONS = VerifyOptions(probe=FAST_PROBE)
PHASES = {"bf16": dict(type="bf16"), "q8": dict(phase="2b"), "q4": dict(phase="1b"), "q3": dict(phase="2c"),
          "q2": dict(phase="3a")}


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    from s2conv.checkpoint import open_checkpoint

    return open_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def ref_run(ckpt):
    return reference_outputs(ckpt, OPTIONS)


@pytest.fixture(scope="module")
def reports(tiny_checkpoint, ckpt, ref_run, tmp_path_factory):
    """One export and one verify per type, sharing the source model's outputs."""
    out = tmp_path_factory.mktemp("verify")
    ref = ref_run
    result = {}
    for name, kw in PHASES.items():
        path = out / f"{name}.gguf"
        export_gguf(tiny_checkpoint, path, Policy.from_options(**kw), ckpt=ckpt, tokenizer_json=False)
        result[name] = verify_gguf(path, ckpt, OPTIONS, ref_run=ref)
    return result


def test_bf16_export_is_exact_and_kl_zero(reports):
    r = reports["bf16"]
    assert r.passed, r.failures
    summary = r.tensors.summary()
    for comp in ("slow_ar", "fast_ar", "embeddings"):
        assert summary[comp]["exact"] and summary[comp]["rel_rmse"] == 0
    assert all(rec.must_be_exact for rec in r.tensors.records if not rec.name.startswith("c."))
    assert not r.tensors.missing and not r.tensors.unexpected
    for head in r.heads.values():
        assert head.kl_mean < 1e-6 and head.top1 == 1.0
    assert r.greedy.frame_match == 1.0
    # the codec is stored as f16 from an fp32 source: small, nonzero, within the f16 limit
    codec = summary["codec"]
    assert 0 < codec["rel_rmse"] < THRESHOLDS["f16"].max_rel_rmse
    assert r.audio.snr_db > 20 and r.audio.mel_distance < 0.1


def test_errors_ordered_by_bits(reports):
    names = ("q8", "q4", "q3", "q2")
    tensor_err = [reports[n].tensors.summary()["slow_ar"]["rel_rmse"] for n in names]
    kl = [reports[n].heads["semantic"].kl_mean for n in names]
    assert tensor_err == sorted(tensor_err) and len(set(tensor_err)) == 4, tensor_err
    assert kl == sorted(kl) and kl[0] > 1e-6, kl
    for n in names:
        assert reports[n].passed, reports[n].failures  # every tensor within its format's THRESHOLDS limit
        assert reports[n].tensors.summary()["fast_ar"]["exact"]  # --target slow keeps the fast AR exact


def test_gates_fail_with_one_line(reports, ckpt, ref_run):
    r = reports["q2"]
    assert r.heads["semantic"].kl_mean > 0.01
    gated = verify_gguf(r.path, ckpt, VerifyOptions(max_kl=0.01, min_top1=0.999, levels=("model",),
                                                    probe=FAST_PROBE), ref_run=ref_run)
    assert not gated.passed and len(gated.failures) == 4
    with pytest.raises(VerifyFailed) as e:
        gated.check()
    assert "\n" not in str(e.value) and "--max-kl" in str(e.value)
    loose = verify_gguf(r.path, ckpt, VerifyOptions(max_kl=100.0, min_top1=0.0, levels=("model",),
                                                    probe=FAST_PROBE), ref_run=ref_run)
    loose.check()


def test_lossless_mismatch_is_a_failure(reports, ckpt, monkeypatch):
    real = GGUFFile.dequantize

    def off_by_one_ulp(self, name, dtype=torch.float32, device="cpu"):
        t = real(self, name, dtype, device)
        return t + 1e-3 if name == "layers.0.attention_norm.weight" else t

    monkeypatch.setattr(GGUFFile, "dequantize", off_by_one_ulp)
    r = verify_gguf(reports["bf16"].path, ckpt, VerifyOptions(levels=("tensors",)))
    assert r.failures == [f for f in r.failures if "layers.0.attention_norm.weight" in f] and len(r.failures) == 1
    assert "lossless" in r.failures[0]


def test_report_json_table_and_plots(reports, tmp_path):
    r = reports["q4"]
    d = r.to_dict()
    for key in ("file", "reference", "file_bytes", "formats", "passed", "failures", "tensors", "heads", "audio",
                "greedy", "seconds"):
        assert key in d
    assert set(d["heads"]) == {"semantic", "fast"} | {f"cb{i}" for i in range(1, 10)}
    assert set(d["heads"]["semantic"]) >= {"kl_mean", "kl_p99", "top1", "dp_abs_mean", "n"}
    assert set(d["tensors"]["summary"]) == {"slow_ar", "fast_ar", "embeddings", "codec", "total"}
    json.dumps(d, allow_nan=False)
    table = r.table()
    assert "semantic" in table and "slow_ar" in table and table.rstrip().endswith("PASS")
    pytest.importorskip("matplotlib")
    note = plot_layer_heatmap(r.tensors.per_layer(), tmp_path / "h.png")
    assert note.startswith("wrote") and (tmp_path / "h.png").stat().st_size > 1000
    points = [dict(label=k, bytes=v.file_bytes, kl_mean=v.heads["semantic"].kl_mean) for k, v in reports.items()]
    assert plot_size_vs_error(points, tmp_path / "s.png").startswith("wrote")


def test_plots_without_matplotlib(reports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert plot_layer_heatmap(reports["q4"].tensors.per_layer(), tmp_path / "h.png") == MATPLOTLIB_MISSING
    assert not (tmp_path / "h.png").exists()


def test_cli_verify_exit_status(reports, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from s2conv.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["s2conv", "verify", *args])
        try:
            main()
        except SystemExit as e:
            return e.code, capsys.readouterr()
        return 0, capsys.readouterr()

    path = str(reports["q2"].path)
    common = ["--reference", str(tiny_checkpoint), "--frames", "6", "--greedy-frames", "0"]
    code, out = run(path, *common, "--max-kl", "1e-9", "--json", str(tmp_path / "v.json"))
    assert code == 1 and out.err.startswith("error: ") and out.err.count("\n") == 1
    assert "semantic" in out.out and json.loads((tmp_path / "v.json").read_text())["passed"] is False
    code, out = run(path, *common, "--max-kl", "100")
    assert code == 0 and "PASS" in out.out
