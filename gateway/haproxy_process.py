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
import shutil
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


LOG_ROTATE_BYTES = 16 * 1024 * 1024  # a few lines per reload or state change: months of them


def open_log(path: Path, max_bytes: int = LOG_ROTATE_BYTES) -> int:
    """A write-only, append-only fd on HAProxy's log (mode 0600: it names addresses). When
    it has grown past `max_bytes` it becomes `<name>.1` first (a master still writing
    to the old file keeps writing there: appends never overwrite)."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def trim_log(path: Path, max_bytes: int = LOG_ROTATE_BYTES) -> bool:
    """The log of a master that runs on (it outlives raygate: adopted, it may run for
    months) past `max_bytes`: copied to `<name>.1`, then emptied in place. Its fd was opened
    O_APPEND (`open_log`), so HAProxy's next line goes to the start of the emptied file,
    never past a hole; a line written between the copy and the truncation is lost. True if
    it trimmed."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        old = path.with_name(path.name + ".1")
        tmp = path.with_name(path.name + ".1.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with path.open("rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, old)
        os.truncate(path, 0)
    except FileNotFoundError:
        return False
    return True


def log_tail(path: Path, lines: int = 3) -> str:
    """The last ALERT lines of HAProxy's log (else its last lines), for an error that must
    say why HAProxy failed."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    alerts = [line for line in text if line.startswith("[ALERT]")]
    return "\n".join((alerts or text)[-lines:])


class Master:
    """One HAProxy master, held by a pidfd so that a reused pid is never signalled or
    mistaken for it. `child` is set when this process started it (then it is reaped here)."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.child = child
        self._fd: int | None = os.pidfd_open(pid)  # ProcessLookupError if it is gone

    @classmethod
    def spawn(
        cls, argv: Sequence[str], log_path: Path, log_max_bytes: int = LOG_ROTATE_BYTES
    ) -> Master:
        """HAProxy gets raygate's environment without raygate's own settings: a RAYGATE_*
        variable may be a secret (RAYGATE_TOKEN), and HAProxy outlives raygate.

        Its stdout and stderr (its NOTICE/WARNING/ALERT lines: reloads, servers going DOWN
        and UP, a port it cannot bind) go to `log_path`, not to raygate's terminal: raygate
        says what matters in its own words (`haproxy_health`). A file opened for appending,
        not a pipe: HAProxy outlives raygate, and a pipe with no reader would kill it
        (SIGPIPE) or block it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAYGATE_")}
        out = open_log(log_path, log_max_bytes)
        try:
            child = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # raygate decides when HAProxy stops, not a Ctrl-C
            )
        finally:
            os.close(out)  # the child holds its own copy
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
