"""One run per out_dir: an advisory lock (fcntl.flock) on out_dir/.lock, a file holding the holder's pid.

The kernel drops a flock when the process holding it exits in any way, SIGKILL included, so a lock file a
dead run left behind never blocks: the next run takes the lock and says whose it was. A second live run
on the same folder is refused with one line naming the holder's pid.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from .checkpoint import process_exists

LOCK_NAME = ".lock"


class OutDirInUseError(ValueError):
    """Another live process holds the out_dir's lock."""


def check_out_dir(out_dir: str | Path) -> Path:
    """out_dir as a Path, created when missing; an empty name or a path that is not a folder is a
    ValueError naming it (an empty name would mean the current directory)."""
    if str(out_dir).strip() == "":
        raise ValueError("out_dir is empty; name a folder for checkpoints and metrics (e.g. --out_dir=out/run)")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only filesystem, no permission
        raise OSError(e.errno, f"cannot create out_dir {path}: {e.strerror}") from None
    return path


class OutDirLock:
    """`with OutDirLock(out_dir) as lock:` holds out_dir/.lock for the block; lock.note says when a stale
    lock of a dead process was taken over."""

    def __init__(self, out_dir: str | Path, what: str = "run"):
        self.path = check_out_dir(out_dir) / LOCK_NAME
        self.fd: int | None = None
        self.note = ""
        self.what = what

    def acquire(self, wait_s: float = 0.0) -> "OutDirLock":
        """Take the lock; a live holder is an OutDirInUseError, after waiting up to wait_s for it to end."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        except OSError as e:
            raise OSError(e.errno, f"cannot open the lock file {self.path}: {e.strerror}") from None
        deadline = time.monotonic() + wait_s
        try:
            while not _try_flock(fd):
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    raise OutDirInUseError(f"{self.path.parent} is in use by another {self.what} (pid "
                                           f"{holder or 'unknown'} holds {self.path}); wait for it to end or choose "
                                           f"another folder")
                time.sleep(0.2)
        except OutDirInUseError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.note = f"{self.path}: the filesystem does not support locks; one {self.what} at a time is not enforced"
            return self
        previous = _read_pid(fd)
        if previous and previous != os.getpid() and not process_exists(previous):
            self.note = f"took over {self.path} from pid {previous}, which is no longer running"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a pid left in the file means its run did not end cleanly
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_flock(fd: int) -> bool:
    """True when this process now holds the lock, False while another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
