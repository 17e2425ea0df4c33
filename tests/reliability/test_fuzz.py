"""Byte-level fuzzing (scripts/fuzz.py) of valid s2conv and s2.cpp-style files: every mutated file either reads
fine or gives an S2ConvError; none crashes, hangs or grows memory, and none that llama.cpp's C loader rejects gets
past the validator. The counts are printed (visible with -s or in the captured output of a failure)."""
from __future__ import annotations

import pytest
import s2conv_fuzz as fuzz

from oracle import load_ggml

STRUCTURAL_CASES = 2000  # validator + GGUFFile + inspect on each
LOAD_CASES = 100  # of which every one also goes through the runtime loader
WEIGHTS = [0.1, 0.1, 0.8]  # q4, f16 (17-19 MB, gguf-py needs ~0.2 s to open them), minimal (1 KB)


@pytest.fixture(scope="module")
def sources(tiny_checkpoint, tmp_path_factory):
    return fuzz.make_sources(tiny_checkpoint, tmp_path_factory.mktemp("fuzz-src"))


def _report(capsys, label: str, stats) -> None:
    with capsys.disabled():
        print(f"\n[fuzz {label}] {stats.line()}")
        for name, (ok, err, crash) in stats.by_source.items():
            print(f"[fuzz {label}]   {name}: {ok} ok, {err} clean errors, {crash} crashes")


def _check(stats, cases: int) -> None:
    assert stats.cases == cases
    first = "\n\n".join(f"case {i} ({src}: {what})\n{tb}" for i, src, what, tb in stats.crash_reports[:3])
    assert stats.crashes == 0 and stats.oracle_disagreements == 0, first
    assert stats.ok > 0 and stats.clean_errors > 0  # the mutations are neither all fatal nor all inert
    assert stats.max_rss_growth_mb < 500, stats.line()


def test_sources_are_valid_files(sources):
    for src in sources:
        fuzz.read_everything(src.path)
        assert len(src.fields) > 10
    assert [s.name for s in sources] == ["s2conv-q4", "s2cpp-f16", "minimal"]


def test_mutated_headers_never_crash(sources, tmp_path, capsys):
    stats = fuzz.fuzz(sources, STRUCTURAL_CASES, seed=1234, weights=WEIGHTS, oracle=load_ggml(),
                      crash_dir=tmp_path / "crashes", workdir=tmp_path)
    _report(capsys, "readers", stats)
    _check(stats, STRUCTURAL_CASES)


def test_mutated_models_never_crash_the_loader(sources, tmp_path, capsys):
    stats = fuzz.fuzz(sources[:2], LOAD_CASES, seed=99, load_every=1, crash_dir=tmp_path / "crashes",
                      workdir=tmp_path)
    _report(capsys, "load_model", stats)
    _check(stats, LOAD_CASES)
    assert stats.loads == LOAD_CASES


@pytest.mark.slow
def test_long_fuzz(sources, tmp_path, capsys):
    stats = fuzz.fuzz(sources, 20000, seed=7, weights=[0.2, 0.2, 0.6], load_every=40, oracle=load_ggml(),
                      crash_dir=tmp_path / "crashes", workdir=tmp_path)
    _report(capsys, "long", stats)
    _check(stats, 20000)
