"""HAProxy processes of one work dir, read from /proc independently of the engine's own
lookup: a process is ours when its executable is named haproxy and its command line has
`-f <our config file>`, and a master is one whose parent is not ours (workers are the
master's children)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path


def haproxy_processes(config_path: Path) -> dict[int, int]:
    """pid -> parent pid of every live HAProxy process run with `-f config_path`."""
    needle = str(config_path).encode()
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            exe = os.readlink(f"/proc/{entry}/exe")
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        named = any(a == b"-f" and b == needle for a, b in itertools.pairwise(args))
        if fields[0] != "Z" and named and Path(exe.removesuffix(" (deleted)")).name == "haproxy":
            found[int(entry)] = int(fields[1])
    return found


def haproxy_masters(config_path: Path) -> list[int]:
    procs = haproxy_processes(config_path)
    return sorted(pid for pid, parent in procs.items() if parent not in procs)
