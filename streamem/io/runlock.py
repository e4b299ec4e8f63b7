"""One streamem job per run folder: an exclusive ``flock`` on ``--out/.streamem.lock``.

refine3d, class3d and class2d hold the lock for the whole job, so a second job on the
same folder (another ``--continue``, a fresh start) is refused at once instead of
mixing its files with the first's. The lock file holds JSON ``{"pid", "host",
"command", "started"}`` of its holder, for the refusal's message.

Why ``flock``: the kernel drops the lock when its holder exits in any way (SIGKILL
included), so a stale lock file never blocks anyone; only a file that is *locked*
means a job runs. The holder removes the file at release. A job that opened the file
just before the previous holder removed it could lock an unlinked inode while a third
job locks a new file at the same path; so after locking, :func:`acquire` checks that
the path still names the locked inode, and starts over if not.

The lock is advisory and per host: on a network filesystem whose ``flock`` is not
shared between hosts (old NFS), two hosts are not kept apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamem.errors import InputError

LOCK_NAME = ".streamem.lock"


def lock_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOCK_NAME


@dataclass
class RunLock:
    """A held lock: the open file descriptor ``fd`` on ``path`` (``flock(LOCK_EX)``)."""

    path: Path
    fd: int

    def release(self, remove: bool = True) -> None:
        """Unlock; ``remove``: also delete the lock file (only if it is still ours)."""
        if self.fd < 0:
            return
        try:
            if remove and _same_inode(self.path, self.fd):
                os.unlink(self.path)  # before unlocking: nobody can lock it after this
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _same_inode(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _busy(out_dir: Path, fd: int) -> InputError:
    """The refusal for a folder whose lock another process holds (names its pid)."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:  # the holder has locked but not yet written its line
        holder = {}
    pid = holder.get("pid") if isinstance(holder, dict) else None
    who = f"another streamem job (pid {pid})" if pid else "another streamem job"
    host = holder.get("host") if isinstance(holder, dict) else None
    if host and host != socket.gethostname():
        who += f" on {host}"
    return InputError(out_dir, f"{who} is running in this folder")


def check_free(out_dir: str | Path) -> None:
    """Raise the one-line refusal if a job holds ``out_dir``'s lock; creates nothing."""
    out_dir = Path(out_dir)
    try:
        fd = os.open(lock_path(out_dir), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(out_dir, fd) from None
    finally:
        os.close(fd)  # also drops the shared lock we may have taken


def acquire(out_dir: str | Path, command: str | None = None) -> RunLock:
    """Lock ``out_dir`` (an existing folder) for this process; InputError if a job holds it.

    Writes ``{"pid", "host", "command", "started"}`` into the lock file once locked.
    ``command`` defaults to this process's command line.
    """
    out_dir = Path(out_dir)
    path = lock_path(out_dir)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _busy(out_dir, fd)
            os.close(fd)
            raise error from None
        if _same_inode(path, fd):
            break
        os.close(fd)  # the previous holder removed the file meanwhile: lock the new one
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return RunLock(path, fd)


@contextmanager
def run_lock(out_dir: str | Path, command: str | None = None) -> Iterator[RunLock]:
    """``acquire`` for the duration of a ``with`` block; the lock file is removed after."""
    lock = acquire(out_dir, command)
    try:
        yield lock
    finally:
        lock.release()
