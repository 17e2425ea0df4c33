"""AtomicDir removes the temporary directories that a SIGKILLed run left, and only those; AtomicDir and AtomicFile
leave none of their own when interrupted."""
import os
import subprocess
import sys

import pytest

from s2conv.converter.atomic import TMP_MARK, AtomicDir, AtomicFile


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


def test_an_interrupt_right_after_the_temporary_dir_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A SIGTERM that a non-main thread receives is not held back by the main thread's signal mask: its handler
    can raise KeyboardInterrupt right after mkdir returns, before the directory's name is stored anywhere else."""
    real_mkdir = os.mkdir

    def mkdir_then_interrupt(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(os, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with AtomicDir(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interrupted_after,kept", [(1, b"old"), (2, b"new")])
def test_an_interrupted_forced_overwrite_keeps_one_complete_output(tmp_path, monkeypatch, interrupted_after, kept):
    """--force renames the old output aside, then the new one in: interrupted after the first rename, the old
    output comes back; after the second, the new one stays; no temporary name is left either way."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "file").write_bytes(b"old")
    real_replace, renames = os.replace, []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        renames.append(dst)
        if len(renames) == interrupted_after:
            raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with AtomicDir(out, force=True) as tmp:
            (tmp / "file").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "file").read_bytes() == kept


def test_an_interrupt_before_a_forced_file_is_renamed_in_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """--force links the finished file under a temporary name, then renames it over the target."""
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt("signal 15")

    with pytest.raises(KeyboardInterrupt):
        with AtomicFile(target, force=True) as f:
            os.write(f.fd, b"new")
            monkeypatch.setattr(os, "replace", interrupted_replace)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert target.read_bytes() == b"old"
