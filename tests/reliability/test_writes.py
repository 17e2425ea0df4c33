"""Writing safely: export and unpack fail with one line and leave nothing when writes fail (a file size limit makes
real writes fail, as a full disk does), and unpack interrupted at random points leaves no partial directory.

SIGKILL cannot be caught: a killed unpack may leave its temporary directory `.<name>.<random>.s2conv-tmp` (the
export leaves nothing: its file is an anonymous O_TMPFILE inode until linked). Both refuse to overwrite without
--force (tests/test_export.py, tests/test_unpack.py).
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from s2conv.converter import export_gguf, policy_from_options
from s2conv.converter import unpack as unpack_mod
from s2conv.converter.atomic import TMP_MARK
from s2conv.converter.unpack import unpack_gguf

# run the CLI with RLIMIT_FSIZE: a write past the limit fails with EFBIG (SIGXFSZ ignored), like a full disk
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["s2conv"] + sys.argv[2:]
from s2conv.cli import main
main()
"""


@pytest.fixture(scope="module")
def q4(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("writes") / "q4.gguf"
    export_gguf(tiny_checkpoint, out, policy_from_options(type="q4"), tokenizer_json=False)
    return out


@pytest.fixture(scope="module")
def unpacked(q4, tmp_path_factory) -> tuple[dict[str, bytes], float]:
    """The uninterrupted unpack's files and how long it took in-process."""
    t0 = time.perf_counter()
    d = unpack_gguf(q4, tmp_path_factory.mktemp("ref") / "ref").path
    return {p.name: p.read_bytes() for p in d.iterdir()}, time.perf_counter() - t0


def _clean(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_failed_writes_are_one_line_and_leave_nothing(tiny_checkpoint, q4, tmp_path, capsys):
    """Limits below the GGUF (17 MB), below the safetensors shard (5 MB) and between the shard and codec.pth."""
    runs = []
    for i, (limit, args) in enumerate([
        (1 << 20, ["export", str(tiny_checkpoint), "--type", "q4", "--quiet"]),
        (1 << 20, ["unpack", str(q4)]),
        (10 << 20, ["unpack", str(q4)]),
    ]):
        d = tmp_path / f"w{i}"
        d.mkdir()
        p = subprocess.Popen([sys.executable, "-c", LIMITED, str(limit), *args, "-o", str(d / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((d, args[0], limit, p))
    for d, cmd, limit, p in runs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 1, (cmd, limit, err)
        assert err.startswith("error: cannot write") and len(err.strip().splitlines()) == 1, (cmd, limit, err)
        assert _clean(d) == [], (cmd, limit, _clean(d))
    with capsys.disabled():
        print(f"\n[writes] {len(runs)} exports/unpacks with failing writes: {len(runs)} one-line errors, "
              f"partial files 0, temporary files left 0")


def test_unpack_exception_or_interrupt_leaves_nothing(q4, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = unpack_mod.dequantize_tensor

    def failing(reader, t):
        calls["n"] += 1
        if calls["n"] == 50:
            raise exc
        return real(reader, t)

    monkeypatch.setattr(unpack_mod, "dequantize_tensor", failing)
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        calls["n"] = 0
        with pytest.raises(type(exc)):
            unpack_gguf(q4, tmp_path / "out")
        assert _clean(tmp_path) == []


def _signal_when_writing(p: subprocess.Popen, d: Path, sig: signal.Signals, delay: float, seen: list) -> None:
    """Wait until the unpack's temporary directory appears in d, then `delay` s more, then signal it."""
    while p.poll() is None and not any(TMP_MARK in n for n in _clean(d)):
        time.sleep(0.005)
    time.sleep(delay)
    if p.poll() is None:
        seen.append(any(TMP_MARK in n for n in _clean(d)))
        p.send_signal(sig)


@pytest.mark.parametrize("rounds", [pytest.param(1, id="3"), pytest.param(6, id="18", marks=pytest.mark.slow)])
def test_interrupted_unpacks_leave_nothing_or_the_complete_directory(q4, unpacked, tmp_path, capsys, rounds):
    ref, seconds = unpacked
    rng = random.Random(rounds)
    procs, threads, mid_write = [], [], []
    for i, sig in enumerate([signal.SIGTERM, signal.SIGINT, signal.SIGKILL] * rounds):
        d = tmp_path / f"u{i}"
        d.mkdir()
        p = subprocess.Popen([sys.executable, "-m", "s2conv", "unpack", str(q4), "-o", str(d / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((d, sig, p))
        threads.append(threading.Thread(target=_signal_when_writing,
                                        args=(p, d, sig, rng.uniform(0, seconds), mid_write)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = {"complete": 0, "absent": 0, "kill leftovers": 0}
    for d, sig, p in procs:
        _, err = p.communicate(timeout=600)
        out = d / "out"
        names = _clean(d)
        if out.exists():
            assert {f.name: f.read_bytes() for f in out.iterdir()} == ref  # complete, never partial
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
            assert p.returncode != 0
            if sig != signal.SIGKILL:
                assert p.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
        temps = [n for n in names if n != "out"]
        if sig == signal.SIGKILL:
            assert all(n.startswith(".out.") and n.endswith(TMP_MARK) for n in temps), names  # identifiable
            outcomes["kill leftovers"] += len(temps)
        else:
            assert temps == [], (sig, names, err)
    assert sum(mid_write) >= 1  # signals do land while the directory is being written
    with capsys.disabled():
        print(f"\n[writes] {len(procs)} unpacks signalled (TERM/INT/KILL; {sum(mid_write)} mid-write): "
              f"{outcomes['complete']} complete, {outcomes['absent']} absent, partial directories 0, temporary dirs "
              f"left after TERM/INT 0, after KILL {outcomes['kill leftovers']} (named .out.*{TMP_MARK})")
