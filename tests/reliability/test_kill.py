"""Interrupted exports: `s2conv export` killed (SIGKILL) or interrupted (SIGTERM, SIGINT) at random points leaves
either no output or the complete file (byte-identical to an uninterrupted export), and never a temporary file.

Exports write into an anonymous O_TMPFILE inode that is linked in only when complete (converter/atomic.py), so even
SIGKILL leaves nothing behind. Several exports run in parallel to keep the test short.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from s2conv.converter import export_gguf, policy_from_options
from s2conv.converter.atomic import TMP_MARK

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


@dataclass
class Outcome:
    sig: str
    when: str  # "before writing", "while writing" or "after exit"
    delay: float
    returncode: int
    stderr: str
    files: list[str]
    complete: bool | None  # output present and byte-identical to the reference (None: absent)
    tokenizer_ok: bool | None


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory) -> tuple[bytes, float]:
    """The uninterrupted export's bytes and how long it took in-process (the write phase to spread kills over)."""
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    t0 = time.perf_counter()
    export_gguf(tiny_checkpoint, out, policy_from_options(type="q4"), tokenizer_json=False)
    return out.read_bytes(), time.perf_counter() - t0


def _writing(pid: int, d: Path) -> bool:
    """True once process `pid` holds a file open in directory d (the anonymous export file)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith(str(d)) for link in links)


def _one_kill(tiny: Path, d: Path, sig: signal.Signals, early: bool, delay: float, ref: bytes,
              results: list) -> None:
    """Start an export into d; signal it `delay` s after start (early) or after it starts writing; record."""
    d.mkdir()
    out = d / "out.gguf"
    p = subprocess.Popen([sys.executable, "-m", "s2conv", "export", str(tiny), "--type", "q4", "-o", str(out),
                          "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    if not early:
        while p.poll() is None and not _writing(p.pid, d) and time.monotonic() - t0 < 300:
            time.sleep(0.005)
    time.sleep(delay)
    when = "after exit" if p.poll() is not None else ("while writing" if _writing(p.pid, d) else "before writing")
    if p.poll() is None:
        p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    files = sorted(f.name for f in d.iterdir())
    tok = d / "tokenizer.json"
    results.append(Outcome(
        sig.name, when, delay, p.returncode, err, files,
        out.read_bytes() == ref if out.exists() else None,
        tok.read_bytes() == (tiny / "tokenizer.json").read_bytes() if tok.exists() else None,
    ))


def _run_kills(tiny: Path, root: Path, n: int, ref: bytes, write_s: float, seed: int, parallel: int) -> list:
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        early = i % 4 == 0  # a quarter while Python starts up and plans, the rest spread over the write phase
        delay = rng.uniform(0, 6.0) if early else rng.uniform(0, 2.0 * write_s)
        plans.append((SIGNALS[i % 3], early, delay))
    results: list[Outcome] = []
    for start in range(0, n, parallel):
        threads = [threading.Thread(target=_one_kill, args=(tiny, root / f"k{i}", sig, early, delay, ref, results))
                   for i, (sig, early, delay) in enumerate(plans[start:start + parallel], start)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def _check(results: list[Outcome], n: int, capsys) -> None:
    assert len(results) == n
    partial = [r for r in results if r.complete is False or r.tokenizer_ok is False]
    leftovers = [r for r in results if any(TMP_MARK in f or f.startswith(".") for f in r.files)]
    stray = [r for r in results if set(r.files) - {"out.gguf", "tokenizer.json"}]
    assert not partial and not leftovers and not stray, (partial, leftovers, stray)
    for r in results:
        if r.complete is None:  # interrupted: nothing at all may be left
            assert r.files in ([], ["tokenizer.json"]) and r.returncode != 0, r
        if r.when == "while writing" and r.sig != "SIGKILL" and r.complete is None:
            # a clean interrupt: one line, exit 130 (a signal while the output is being linked may still finish)
            assert r.returncode == 130 and r.stderr.strip().splitlines()[-1] == "error: interrupted", r
    with capsys.disabled():
        counts = {w: sum(r.when == w for r in results) for w in ("before writing", "while writing", "after exit")}
        print(f"\n[kill] {n} exports signalled ({', '.join(f'{k} {v}' for k, v in counts.items())}; "
              f"{sum(r.sig == 'SIGKILL' for r in results)} SIGKILL): "
              f"{sum(r.complete is True for r in results)} complete files, "
              f"{sum(r.complete is None for r in results)} absent, partial files 0, temporary files left 0")


def test_killed_exports_leave_nothing_or_the_complete_file(tiny_checkpoint, reference, tmp_path, capsys):
    ref, write_s = reference
    results = _run_kills(tiny_checkpoint, tmp_path, 8, ref, write_s, seed=1, parallel=8)
    _check(results, 8, capsys)
    assert any(r.when == "while writing" and r.complete is None for r in results)  # kills did land mid-write


@pytest.mark.slow
def test_many_killed_exports(tiny_checkpoint, reference, tmp_path, capsys):
    ref, write_s = reference
    results = _run_kills(tiny_checkpoint, tmp_path, 24, ref, write_s, seed=2, parallel=6)
    _check(results, 24, capsys)
