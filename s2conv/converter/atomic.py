"""Atomic output files and directories: nothing appears at the target path until the content is complete.

Files are written to an anonymous O_TMPFILE inode in the target directory (Linux) and linked in at the end, so even
SIGKILL leaves no partial or temporary file behind; elsewhere a hidden temporary name in the same directory is used
and removed on failure. `AtomicDir` builds a directory under a temporary name and renames it at the end.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from s2conv.errors import ConversionError

TMP_MARK = ".s2conv-tmp"  # every temporary name s2conv creates contains this
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _LIBC.linkat  # noqa: B018  (present on Linux)
except (OSError, AttributeError):
    _LIBC = None


def os_error(what: str, path: Path, e: OSError) -> ConversionError:
    """One-line error for a failed write, naming the path and the cause."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.ENOSPC:
        reason += " (disk full)"
    return ConversionError(f"{what} {path}: {reason}")


def check_target(path: Path, force: bool) -> None:
    """Refuse an existing target without force, a missing or unwritable directory."""
    parent = path.parent
    if path.exists() and not force:
        raise ConversionError(f"{path} exists; pass --force to overwrite it")
    if path.is_dir():
        raise ConversionError(f"{path} is a directory")
    if not parent.is_dir():
        raise ConversionError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"output directory {parent} is not writable")


class AtomicFile:
    """`with AtomicFile(target, force) as f:` gives `f.path` (a path that opens the temporary file) and `f.fd`;
    on a clean exit the file is fsynced and appears at `target`; on any exception nothing is left behind."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        self.fd = -1
        self.path: str = ""
        self._named: Path | None = None

    def __enter__(self) -> "AtomicFile":
        check_target(self.target, self.force)
        parent = self.target.parent
        try:
            if _LIBC is None:
                raise OSError(errno.EOPNOTSUPP, "no linkat")
            self.fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, 0o644)
            self.path = f"/proc/self/fd/{self.fd}"
            if not os.path.exists(self.path):  # no /proc: cannot reopen or link the anonymous file
                os.close(self.fd)
                raise OSError(errno.EOPNOTSUPP, "no /proc")
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS):
                raise os_error("cannot write to", parent, e) from None
            fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=TMP_MARK, dir=parent)
            self.fd, self.path, self._named = fd, name, Path(name)
        return self

    def commit(self) -> None:
        os.fsync(self.fd)
        if self._named is not None:
            if self.target.exists() and not self.force:
                raise ConversionError(f"{self.target} appeared while writing; pass --force to overwrite it")
            os.replace(self._named, self.target)
            self._named = None
        elif self.force:
            self._named = tmp = self.target.with_name(f".{self.target.name}.{os.getpid()}{TMP_MARK}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            _link_fd_path(self.path, tmp)  # (named before it exists: an interrupt from here on finds it, __exit__)
            os.replace(tmp, self.target)
            self._named = None
        else:
            try:
                _link_fd_path(self.path, self.target)  # fails if the target appeared meanwhile: never overwrite
            except FileExistsError:
                raise ConversionError(f"{self.target} appeared while writing; pass --force to overwrite it") from None
        _fsync_dir(self.target.parent)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self._named is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._named)


class AtomicDir:
    """`with AtomicDir(target, force) as tmp:` builds the directory at `tmp`, renamed to `target` on success."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.force:
            raise ConversionError(f"{self.target} exists; pass --force to overwrite it")
        parent = self.target.parent
        if not parent.is_dir():
            raise ConversionError(f"output directory {parent} does not exist")
        _remove_stale_dirs(parent, self.target.name)
        try:
            with _signals_deferred():
                while True:
                    # the name is known before the directory exists, so that an interrupt raised right after
                    # mkdir (a signal another thread received is not held back by this thread's mask) finds it
                    self.tmp = parent / f".{self.target.name}.{os.getpid()}.{secrets.token_hex(8)}{TMP_MARK}"
                    try:
                        os.mkdir(self.tmp, 0o700)
                        break
                    except FileExistsError:
                        continue
        except OSError as e:
            self.tmp = None
            raise os_error("cannot write to", parent, e) from None
        except BaseException:  # KeyboardInterrupt: `with` calls no __exit__ when __enter__ raises
            self._discard()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            with _signals_deferred():
                self._discard()
            return
        old = None
        try:
            # fsyncs, renames and the old directory's removal run with SIGINT / SIGTERM held back: an interrupt
            # arriving meanwhile takes effect once the target is complete and no temporary name is left
            with _signals_deferred():
                for f in self.tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                if self.target.exists():
                    old = self.target.with_name(f".{self.target.name}.old{TMP_MARK}")
                    os.replace(self.target, old)
                os.replace(self.tmp, self.target)
                _fsync_dir(self.target.parent)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        except BaseException:  # (an interrupt another thread received can still land inside the block)
            if old is not None and old.exists():
                if self.target.exists():  # the new output is in place: the old one goes, as planned
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
                else:  # interrupted between the two renames: the previous output back where it was
                    os.replace(old, self.target)
            self._discard()
            raise

    def _discard(self) -> None:
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _remove_stale_dirs(parent: Path, name: str) -> None:
    """Remove temporary directories left by a killed (SIGKILL) unpack of `name`: their creator's pid, which the
    directory name carries, no longer runs. Directories of live processes are left alone."""
    for d in parent.glob(f".{glob.escape(name)}.*{TMP_MARK}"):
        pid = d.name[len(name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or not d.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # exists but not ours to signal: alive
            pass


def _link_fd_path(src: str, dst: Path) -> None:
    """Give the anonymous file behind `/proc/self/fd/N` a name: linkat(..., AT_SYMLINK_FOLLOW).

    Python's os.link calls link(2), which links the /proc symlink itself and fails with EXDEV; glibc's linkat with
    AT_SYMLINK_FOLLOW is the documented way to materialize an O_TMPFILE file without privileges."""
    rc = _LIBC.linkat(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(str(dst)), _AT_SYMLINK_FOLLOW)
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        raise OSError(err, os.strerror(err), str(dst))


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM back from this thread while the block runs (they are delivered when it ends); no-op
    where the platform has no signal masks. Only this thread's mask: a signal that another thread (torch's, numpy's)
    receives still runs the Python handler in the main thread during the block, so code inside must stay safe when
    interrupted anywhere (as `AtomicDir` does)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while the block runs (main thread only), so cleanup handlers run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
