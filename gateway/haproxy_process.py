"""The HAProxy master process, whoever started it.

HAProxy outlives raygate on purpose (its own session): a raygate that died, or stopped with
`--on-exit keep`, leaves it serving, and the next raygate on the same work dir adopts it
instead of starting a second master on the same port (SO_REUSEPORT would let both bind and
the stale one would route by an old table). So a master is watched by pid, through a pidfd,
whether raygate started it or adopted it, and it is started with `subprocess.Popen`, not an
asyncio subprocess: an asyncio subprocess transport kills its child when it is closed, which
would take HAProxy down with the event loop.

A process is ours when it runs the HAProxy binary (/proc/<pid>/exe) with our config file (a
path inside our state dir) as the argument of `-f`: that is how leftovers are found, and why a
pid file naming someone else's process is ignored. Naming the file is not enough: an
operator's `tail -f .../haproxy.cfg`, a pager or an editor names it too, and must never be
taken for a stale master and signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path


def processes_of(config_path: Path, binary: str | None = None) -> dict[int, int]:
    """pid -> parent pid of every live HAProxy process of `config_path` (see `is_ours`)."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not is_ours(int(entry), config_path, binary):
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[int(entry)] = int(fields[1])
    return found


def masters_of(config_path: Path, binary: str | None = None) -> list[int]:
    """Masters among them: workers are their master's children, a master's parent is not
    one of ours. The pid file adds its pid if that process is ours too (it may have been
    re-executed by a reload while this scan ran)."""
    procs = processes_of(config_path, binary)
    found = {pid for pid, parent in procs.items() if parent not in procs}
    pid = read_pid(config_path.parent / "haproxy.pid")
    if pid is not None and is_ours(pid, config_path, binary):
        found.add(pid)
    return sorted(found)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_ours(pid: int, config_path: Path, binary: str | None = None) -> bool:
    """Process `pid` runs HAProxy (its executable is `binary`, or is named haproxy: the
    file may have been replaced by an upgrade since it started) with `-f config_path`."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if Path(exe).name != "haproxy" and (binary is None or exe != os.path.realpath(binary)):
        return False
    wanted = str(config_path).encode()
    return any(a == b"-f" and b == wanted for a, b in itertools.pairwise(args))


class Master:
    """One HAProxy master, held by a pidfd so that a reused pid is never signalled or
    mistaken for it. `child` is set when this process started it (then it is reaped here)."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.child = child
        self._fd: int | None = os.pidfd_open(pid)  # ProcessLookupError if it is gone

    @classmethod
    def spawn(cls, argv: Sequence[str]) -> Master:
        """HAProxy gets raygate's environment without raygate's own settings: a RAYGATE_*
        variable may be a secret (RAYGATE_TOKEN), and HAProxy outlives raygate."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAYGATE_")}
        child = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # raygate decides when HAProxy stops, not a Ctrl-C
        )
        return cls(child.pid, child)

    @property
    def adopted(self) -> bool:
        return self.child is None

    def exited(self) -> bool:
        if self._fd is None:
            return True
        ready, _, _ = select.select([self._fd], [], [], 0)
        if ready and self.child is not None:
            self.child.poll()  # reap it
        return bool(ready)

    @property
    def returncode(self) -> int | None:
        """The exit code of a child that exited; None otherwise (unknown when adopted)."""
        return self.child.poll() if self.child is not None else None

    async def wait(self) -> None:
        """Until the process exits (a pidfd turns readable then, child or not)."""
        if self.exited() or self._fd is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not done.done():
                done.set_result(None)

        fd = self._fd
        loop.add_reader(fd, ready)
        try:
            await done
        finally:
            loop.remove_reader(fd)
        self.exited()  # reaps a child

    async def wait_for(self, timeout_s: float) -> bool:
        """True if it exited within `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.wait()
        return self.exited()

    def send(self, sig: int) -> None:
        if self._fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, sig)

    async def stop(self, grace_s: float) -> None:
        """Soft stop (SIGUSR1: listeners close, in-flight requests finish), then SIGTERM,
        then SIGKILL."""
        for sig, wait_s in ((signal.SIGUSR1, grace_s), (signal.SIGTERM, 5.0)):
            self.send(sig)
            if await self.wait_for(wait_s):
                return
        self.send(signal.SIGKILL)
        await self.wait_for(5)

    def close(self) -> None:
        """Stop watching it; the process itself is left alone."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
