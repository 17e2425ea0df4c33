"""Determinism: `s2conv export` writes byte-identical files across runs, processes (different hash seeds) and
--threads 1/2; `unpack` too. (tests/test_export.py checks q4_k_m across threads in-process; greedy synthesis across
loads is in test_synth_input.py, seeded sampling in tests/test_runtime_pipeline.py.)"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from s2conv.converter import export_gguf, policy_from_options
from s2conv.converter.unpack import unpack_gguf


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli_export(ckpt, out, threads: int, hashseed: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    return subprocess.Popen([sys.executable, "-m", "s2conv", "export", str(ckpt), "--type", "q4", "-o", str(out),
                             "--threads", str(threads), "--quiet", "--no-tokenizer-json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _exports_agree(tiny_checkpoint, tmp_path, capsys, runs: list[tuple[int, str]]) -> None:
    """An in-process export (2 threads) and CLI exports with (threads, PYTHONHASHSEED) give one sha256."""
    procs = [(tmp_path / f"cli{i}.gguf", t, _cli_export(tiny_checkpoint, tmp_path / f"cli{i}.gguf", t, h))
             for i, (t, h) in enumerate(runs)]
    ref = tmp_path / "inproc.gguf"
    export_gguf(tiny_checkpoint, ref, policy_from_options(type="q4"), threads=2, tokenizer_json=False)
    for _, _, p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    digests = {_sha(ref)} | {_sha(out) for out, _, _ in procs}
    assert len(digests) == 1, digests
    with capsys.disabled():
        print(f"\n[determinism] {1 + len(runs)} q4 exports (in-process --threads 2, CLI --threads "
              f"{[t for t, _ in runs]}): 1 distinct sha256 {digests.pop()[:16]}..., {ref.stat().st_size:,} bytes")


def test_cli_export_equals_in_process_export_across_threads(tiny_checkpoint, tmp_path, capsys):
    _exports_agree(tiny_checkpoint, tmp_path, capsys, [(1, "1")])


@pytest.mark.slow
def test_exports_agree_across_many_processes(tiny_checkpoint, tmp_path, capsys):
    _exports_agree(tiny_checkpoint, tmp_path, capsys, [(1, "1"), (2, "2"), (1, "3"), (2, "4")])


def test_unpack_is_byte_identical_across_runs(tiny_checkpoint, tmp_path):
    gguf = tmp_path / "m.gguf"
    export_gguf(tiny_checkpoint, gguf, policy_from_options(type="q8_0"), tokenizer_json=False)
    a, b = unpack_gguf(gguf, tmp_path / "a").path, unpack_gguf(gguf, tmp_path / "b").path
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "codec.pth" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
