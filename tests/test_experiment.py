"""s2conv experiment / demo: phases end to end on the tiny checkpoint, a forced failure, resuming."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import soundfile as sf

import s2conv.experiment as experiment
from s2conv.errors import ConversionError, S2ConvError
from s2conv.experiment import ExperimentSettings, parse_entries, run_experiment
from s2conv.verify import VerifyOptions
from s2conv.verify.probe import ProbeSettings

SETTINGS = ExperimentSettings(max_frames=8, verify=VerifyOptions(
    probe=ProbeSettings(frames=8, reference_frames=4, greedy_frames=4)))
PHASES = ["1b", "2b", "2c"]  # 2c is made to fail in the first run


class ExportSpy:
    """Wraps export_gguf: counts calls per output directory, fails for directories named in `fail`."""

    def __init__(self, fail=()):
        self.real, self.fail, self.calls = experiment.export_gguf, set(fail), []

    def __call__(self, model, out, policy, **kw):
        self.calls.append(Path(out).parent.name)
        if Path(out).parent.name in self.fail:
            raise ConversionError(f"simulated failure for {Path(out).parent.name}")
        return self.real(model, out, policy, **kw)


@pytest.fixture(scope="module")
def first_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "out"
    spy = ExportSpy(fail={"phase2c"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "export_gguf", spy)
        result = run_experiment(tiny_checkpoint, out, PHASES, settings=SETTINGS)
    return out, result, spy


def test_results_files_and_schema(first_run):
    out, result, spy = first_run
    assert spy.calls == ["reference", "phase1b", "phase2b", "phase2c"]
    data = json.loads((out / "all_results.json").read_text())
    assert data == json.loads(json.dumps(result.results))  # the file holds what the function returned
    assert set(data) == {"model", "settings", "reference", "phases"}
    assert list(data["phases"]) == PHASES
    ref = data["reference"]
    assert ref["status"] == "ok" and ref["type"] == "bf16" and ref["frames"] > 0
    for name in ("1b", "2b"):
        r = data["phases"][name]
        assert r["status"] == "ok" and r["error"] is None
        assert set(r) >= {"type", "target", "file_bytes", "size_vs_bf16", "compression", "verify", "samples",
                          "frames_per_s", "seconds"}
        assert 0 < r["size_vs_bf16"] < 1 and r["compression"] == pytest.approx(1 / r["size_vs_bf16"])
        assert r["file_bytes"] == (out / r["file"]).stat().st_size
        assert r["verify"]["passed"] and r["frames_per_s"] > 0
        assert set(r["verify"]["heads"]) >= {"semantic", "fast"}
        assert (out / f"phase{name}" / "verify.json").is_file()
    assert (data["phases"]["1b"]["type"], data["phases"]["2b"]["type"]) == ("q4", "q8")
    q4, q8 = (data["phases"][n]["verify"]["heads"]["semantic"]["kl_mean"] for n in ("1b", "2b"))
    assert q4 > q8 > 0
    failed = data["phases"]["2c"]
    assert failed["status"] == "failed" and failed["error"] == "ConversionError: simulated failure for phase2c"


def test_samples_and_reference_clip(first_run):
    out, result, _ = first_run
    for name in ("1b", "2b"):
        for kind in ("tts", "clone"):
            wav, sr = sf.read(out / "samples" / f"{name}_{kind}.wav")
            assert sr == 44100 and 0 < len(wav) <= 8 * 512  # at most max_frames frames of the tiny codec
    assert not list((out / "samples").glob("2c_*"))
    clip, _ = sf.read(out / "reference" / "reference.wav")
    assert len(clip) > 0 and abs(clip).max() > 1e-3


def test_summary_size_analysis_and_plots(first_run):
    out, result, _ = first_run
    md = (out / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["reference", "1b", "2b", "2c"]
    assert "failed: ConversionError" in rows[-1]
    sizes = json.loads((out / "size_analysis.json").read_text())
    assert set(sizes) == {"this_model", "s2_pro"}
    assert {"q4", "q8", "bf16"} <= set(sizes["s2_pro"]["types"])
    text = experiment.format_outcome(result)
    assert "samples:" in text and "failed: 2c" in text
    if importlib.util.find_spec("matplotlib"):
        assert (out / "plots" / "size_vs_error.png").is_file() and (out / "plots" / "1b_layers.png").is_file()


def test_resume_skips_complete_phases_and_retries_failed(first_run, tiny_checkpoint, monkeypatch):
    out, _, _ = first_run
    before = {n: (out / f"phase{n}" / "model.gguf").stat().st_mtime_ns for n in ("1b", "2b")}
    spy = ExportSpy()
    monkeypatch.setattr(experiment, "export_gguf", spy)
    result = run_experiment(tiny_checkpoint, out, PHASES, settings=SETTINGS)
    assert spy.calls == ["phase2c"]  # reference, 1b and 2b are complete
    assert {n: (out / f"phase{n}" / "model.gguf").stat().st_mtime_ns for n in ("1b", "2b")} == before
    assert all(r["status"] == "ok" for r in result.results["phases"].values())
    assert (out / "samples" / "2c_clone.wav").is_file()
    # a subset run keeps the other entries in all_results.json
    result = run_experiment(tiny_checkpoint, out, ["2b"], settings=SETTINGS)
    assert list(result.results["phases"]) == PHASES


def test_scripts_quantize_wrapper(first_run, tiny_checkpoint, capsys):
    out, _, _ = first_run
    spec = importlib.util.spec_from_file_location("quantize_script", Path(__file__).parents[1] / "scripts" /
                                                  "quantize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", str(tiny_checkpoint), "--phase", "1b", "--output", str(out), "--max-frames", "8"]) == 0
    assert "| 1b | q4 | slow |" in capsys.readouterr().out
    assert mod.main(["--model", str(out / "nope"), "--output", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_parse_entries():
    assert [e.name for e in parse_entries(["all"])] == ["1a", "1b", "2a", "2b", "2c", "3a", "3b"]
    entries = parse_entries(["3b", "1a", "3b"], ["q4_k_m", "q8_0:all"])
    assert [(e.name, e.type, e.target, e.dirname) for e in entries] == [
        ("3b", "q2", "all", "phase3b"), ("1a", "fp8", "slow", "phase1a"),
        ("q4_k_m-slow", "q4_k_m", "slow", "type-q4_k_m-slow"), ("q8_0-all", "q8_0", "all", "type-q8_0-all")]
    for bad in ((["9z"], []), ([], ["nope"]), ([], ["q4:sideways"]), ([], [])):
        with pytest.raises(S2ConvError):
            parse_entries(*bad)


def test_cli_experiment_bad_phase_is_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from s2conv.cli import main

    monkeypatch.setattr(sys, "argv", ["s2conv", "experiment", str(tiny_checkpoint), "-o", str(tmp_path / "x"),
                                      "--phase", "4a"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: unknown phase '4a'") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_tiny_checkpoint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("S2CONV_CACHE", str(tmp_path / "cache"))
    path = experiment.tiny_checkpoint()
    assert path == tmp_path / "cache" / "tiny" and (path / "config.json").is_file()
    stamp = (path / "codec.pth").stat().st_mtime_ns
    assert experiment.tiny_checkpoint() == path and (path / "codec.pth").stat().st_mtime_ns == stamp  # reused
    (path / "config.json").unlink()  # a broken cache entry is rebuilt
    assert (experiment.tiny_checkpoint() / "config.json").is_file()


@pytest.mark.slow
def test_demo_runs_every_phase_offline(tmp_path, monkeypatch, capsys):
    from s2conv.cli import main

    monkeypatch.setenv("S2CONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["s2conv", "demo", "-o", str(tmp_path / "demo")])
    main()
    out = capsys.readouterr().out
    for phase in ("1a", "1b", "2a", "2b", "2c", "3a", "3b"):
        assert f"| {phase} |" in out and (tmp_path / "demo" / "samples" / f"{phase}_clone.wav").is_file()
    data = json.loads((tmp_path / "demo" / "all_results.json").read_text())
    assert all(r["status"] == "ok" for r in data["phases"].values())
