"""s2conv upload: file selection, model card, dry run, token and network errors (no network used)."""
from __future__ import annotations

import json
import sys

import pytest

from s2conv.errors import S2ConvError
from s2conv.upload import LICENSE_ID, plan_upload, upload


@pytest.fixture
def outdir(tmp_path):
    """A small experiment directory: reference, phase 1b ok, phase 3b failed (files are placeholders)."""
    out = tmp_path / "out"
    for d in ("reference", "phase1b", "phase3b", "samples", "plots"):
        (out / d).mkdir(parents=True)
    (out / "reference" / "model.gguf").write_bytes(b"\0" * 2000)
    (out / "reference" / "reference.wav").write_bytes(b"RIFF")
    (out / "phase1b" / "model.gguf").write_bytes(b"\0" * 1000)
    (out / "phase1b" / "tokenizer.json").write_text("{}")
    (out / "phase3b" / "model.gguf").write_bytes(b"\0" * 700)
    for name in ("1b_tts", "1b_clone", "3b_tts"):
        (out / "samples" / f"{name}.wav").write_bytes(b"RIFF")
    (out / "plots" / "size_vs_error.png").write_bytes(b"PNG")
    (out / "summary.md").write_text("| phase |\n")
    heads = {"semantic": {"kl_mean": 0.0123, "top1": 0.95}, "fast": {"kl_mean": 0.0045, "top1": 0.97}}
    results = dict(model="/models/s2-pro", settings={}, reference=dict(
        name="reference", type="bf16", status="ok", file="reference/model.gguf", file_bytes=2000, frames_per_s=20.0),
        phases={
            "1b": dict(name="1b", type="q4", target="slow", status="ok", error=None, file="phase1b/model.gguf",
                       file_bytes=1000, size_vs_bf16=0.5, compression=2.0, frames_per_s=30.0,
                       verify=dict(passed=True, heads=heads, tensors={"slow_ar": {"rel_rmse": 0.1}},
                                   audio={"snr_db": 29.0}, greedy={"frame_match": 0.5})),
            "3b": dict(name="3b", type="q2", target="all", status="failed", error="ConversionError: boom",
                       file="phase3b/model.gguf"),
        })
    (out / "all_results.json").write_text(json.dumps(results))
    return out


def test_plan_selects_successful_entries(outdir):
    plan = plan_upload(outdir, "me/s2-pro-gguf")
    names = [f.as_posix() for f in plan.files]
    assert names == ["all_results.json", "summary.md", "reference/model.gguf", "reference/reference.wav",
                     "phase1b/model.gguf", "phase1b/tokenizer.json", "samples/1b_clone.wav", "samples/1b_tts.wav",
                     "plots/size_vs_error.png"]
    assert plan.total_bytes == sum((outdir / f).stat().st_size for f in plan.files)


def test_model_card(outdir):
    card = plan_upload(outdir, "me/s2-pro-gguf").card
    front = card.split("---")[1]
    assert f"license_name: {LICENSE_ID}" in front and "license: other" in front
    assert "base_model: fishaudio/s2-pro" in front
    assert "Fish Audio Research License" in card
    assert "| `phase1b/model.gguf` | q4 | slow AR | 0.0 MB | 50.0% |" in card
    assert "0.0123" in card and "phase3b" not in card  # figures of ok phases only
    (outdir / "LICENSE.md").write_text("license text")
    plan = plan_upload(outdir, "me/x")
    assert "license_link: LICENSE.md" in plan.card and "LICENSE.md" in [f.as_posix() for f in plan.files]


def test_dry_run_lists_files_and_card_without_network(outdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any import of it would fail
    text = upload(outdir, "me/s2-pro-gguf", dry_run=True)
    assert "phase1b/model.gguf" in text and "README.md:" in text and "license_name" in text
    assert not (outdir / "README.md").exists()


def test_errors_are_one_line(outdir, tmp_path, monkeypatch):
    for args, match in (((tmp_path / "none", "me/x"), "no all_results.json"), ((outdir, "no-slash"), "USER/NAME")):
        with pytest.raises(S2ConvError, match=match):
            upload(*args, dry_run=True)
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(S2ConvError, match="no Hugging Face token"):
        upload(outdir, "me/x")

    def offline(self, *a, **kw):
        raise ConnectionError("[Errno 111] Connection refused\nmore detail")

    monkeypatch.setattr(hub.HfApi, "create_repo", offline)
    with pytest.raises(S2ConvError) as e:
        upload(outdir, "me/x", token="hf_test")
    assert str(e.value) == "upload to me/x failed: ConnectionError: [Errno 111] Connection refused"


def test_upload_sends_the_planned_files(outdir, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = {}
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))

    def fake_upload_folder(self, **kw):
        calls["upload"] = kw
        return None

    monkeypatch.setattr(hub.HfApi, "upload_folder", fake_upload_folder)
    text = upload(outdir, "me/s2-pro-gguf", token="hf_test", private=True)
    assert calls["repo"] == ("me/s2-pro-gguf", dict(repo_type="model", private=True, exist_ok=True))
    patterns = calls["upload"]["allow_patterns"]
    assert "README.md" in patterns and "phase1b/model.gguf" in patterns and "phase3b/model.gguf" not in patterns
    assert (outdir / "README.md").read_text().startswith("---\nlicense: other")
    assert text.endswith("uploaded to https://huggingface.co/me/s2-pro-gguf")
