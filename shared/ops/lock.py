"""One daemon per state folder: an exclusive lock on ``<folder>/<name>.lock`` holding the daemon's pid.

A second node (or aggregator) started on the same state folder stops at once with a clear message
instead of writing the same files as the first. The lock is the kernel's (``flock``): it goes away
with the process, even after ``kill -9``, so a stale file never blocks a restart. ``stop.sh`` in a
startup kit reads the pid from the file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from shared.errors import FedMedCLIPError


class AlreadyRunningError(FedMedCLIPError):
    """Another live process holds this state folder."""

    reason = "already_running"


class DaemonLock:
    """``with DaemonLock(folder, "node"):`` ... the lock is held (and the pid written) inside."""

    def __init__(self, folder: Path | str, name: str) -> None:
        self.path = Path(folder) / f"{name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another process (pid {holder}) is already running on {self.path.parent}: "
                "stop it first, or give this one its own state folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: stop.sh reports "not running"
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> DaemonLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
