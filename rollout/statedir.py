"""The state dir belongs to one `raygate up` at a time, and to its user only.

Two instances on one state dir each run recovery and stop the other's clusters as orphans
(issue 9, point 4), so `raygate up` takes an exclusive `flock` on `<state dir>/lock` before it
reads or writes anything else there. The lock lives on a close-on-exec descriptor: it dies with
the process (SIGKILL and OOM included, nothing stale to clean up) and is never held by HAProxy
or Ray, which raygate starts with exec and which may outlive it.

The admin token and the database grant code execution on the host (see the README's
Security section), so the dir is 0700 and the files in it 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "lock"
# Files raygate keeps in the state dir that only its user may read. SQLite creates the -wal
# and -shm files with the mode of the database file itself.
PRIVATE_FILES = ("raygate.db", "raygate.db-wal", "raygate.db-shm", "token")


class StateDirBusy(RuntimeError):
    """Another live process holds the state dir's lock."""


class StateDirLock:
    """An exclusive, non-blocking lock on a state dir; `release()` or process exit frees it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise StateDirBusy(
                f"state dir {state_dir} is in use by another raygate{who}; "
                "one `raygate up` per state dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.set_inheritable(fd, False)  # O_CLOEXEC already; say it where it matters
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def make_private(state_dir: Path) -> None:
    """State dir 0700, raygate's own files in it 0600; called with the lock held. Files that do
    not exist yet are created 0600 first, so SQLite's -wal/-shm files inherit that mode."""
    os.chmod(state_dir, 0o700)
    for name in PRIVATE_FILES:
        path = state_dir / name
        if name == "raygate.db":
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)
