"""AtomicDir removes the temporary directories that a SIGKILLed run left, and only those."""
import os
import subprocess
import sys

from s2conv.converter.atomic import TMP_MARK, AtomicDir


def test_stale_temporary_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{int(dead.stdout)}.abc{TMP_MARK}"
    live = tmp_path / f".out.{os.getpid()}.def{TMP_MARK}"
    other = tmp_path / f".other.{int(dead.stdout)}.abc{TMP_MARK}"
    for d in (stale, live, other):
        d.mkdir()
        (d / "part").write_bytes(b"x")
    with AtomicDir(tmp_path / "out") as tmp:
        (tmp / "file").write_bytes(b"done")
    assert (tmp_path / "out" / "file").read_bytes() == b"done"
    assert not stale.exists()  # its creator is gone
    assert live.exists() and other.exists()  # a running process's, and another target's, are left alone
