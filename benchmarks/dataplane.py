"""Data plane benchmark: raygate's gateway against nginx as a reverse proxy, same upstream,
same run, all on loopback. Run it with `./dev bench` (installs nginx and wrk from Debian).

Targets, measured with wrk (-t1) at 32 connections and at 1, GET and a 2 KiB POST:
  direct   wrk -> upstream (nginx answering a 100-byte body)
  nginx    wrk -> nginx reverse proxy (keepalive 64) -> upstream
  raygate  wrk -> `raygate gateway --engine python` (one worker) -> upstream
  raygate2 wrk -> `raygate gateway --engine python --workers 2` -> upstream
  haproxy  wrk -> `raygate gateway --engine haproxy` (one thread, the default) -> upstream
Every proxy gets one core's worth of workers (nginx: worker_processes 1) unless a row says so.
Rounds are interleaved (every target once per round). Medians are reported, and the ratio to
nginx is the median of the per-round ratios: the machine's speed drifts by +-10% over minutes,
and a ratio of two runs seconds apart cancels most of that drift.

It also reports CPU time per request (user + system) of each proxy's whole process tree
(raygate's, with the HAProxy engine: raygate plus HAProxy): requests per second on a 2-core
machine shared by wrk, proxy and upstream depend on how the scheduler shares the cores,
while CPU per request says what a proxy would serve with a core to itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY_100 = "x" * 99 + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx-{name}.pid;
error_log {dir}/error-{name}.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body-{name};
    proxy_temp_path {dir}/proxy-{name};
    fastcgi_temp_path {dir}/fcgi-{name};
    uwsgi_temp_path {dir}/uwsgi-{name};
    scgi_temp_path {dir}/scgi-{name};
    keepalive_requests 1000000;
    {body}
}}
"""

UPSTREAM = """
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "{text}"; }}
    }}
"""

PROXY = """
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

GATEWAYS = ("raygate", "raygate2", "haproxy")
CASES = {  # name: (method label, connections, POST body)
    "get32": ("GET", 32, False),
    "get1": ("GET", 1, False),
    "post32": ("POST 2KiB", 32, True),
    "post1": ("POST 2KiB", 1, True),
}

POST_LUA = """
wrk.method = "POST"
wrk.body = string.rep("p", 2048)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    cpu_s: float = 0.0  # CPU time (user + system) of the target's whole process tree

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants: for a
    raygate gateway that is raygate itself plus, with the HAProxy engine, HAProxy."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a process that just exited
    return total


def wrk(
    url: str, conns: int, seconds: float, script: Path | None, pid: int | None = None
) -> Result:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    cpu0 = tree_cpu_s(pid) if pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    cpu = tree_cpu_s(pid) - cpu0 if pid else 0.0
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    return Result(rps, p50, p99, requests, cpu)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument(
        "--gateways",
        default=",".join(GATEWAYS),
        help="which raygate rows to run (direct and nginx always run)",
    )
    ap.add_argument("--cases", default=",".join(CASES), help="of " + ",".join(CASES))
    args = ap.parse_args()
    chosen = [g for g in args.gateways.split(",") if g]
    picked = [c for c in args.cases.split(",") if c]
    unknown = [g for g in chosen if g not in GATEWAYS] + [c for c in picked if c not in CASES]
    if unknown or not picked:
        print(f"unknown or no gateways/cases: {unknown}", file=sys.stderr)
        return 2
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run ./dev bench, which installs it", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_port() for _ in range(8)]
        up_port, proxy_port, rg_port, rg_admin, rg2_port, rg2_admin, hx_port, hx_admin = ports
        for name, body in (
            ("upstream", UPSTREAM.format(port=up_port, text=BODY_100.replace("\n", "\\n"))),
            ("proxy", PROXY.format(port=proxy_port, upstream=up_port)),
        ):
            conf = work / f"{name}.conf"
            conf.write_text(NGINX_CONF.format(dir=work, name=name, body=body))
            procs.append(subprocess.Popen(["nginx", "-p", str(work), "-c", str(conf)]))
        gateways = {}
        for name, port, admin, extra in (
            ("raygate", rg_port, rg_admin, ["--engine", "python"]),
            ("raygate2", rg2_port, rg2_admin, ["--engine", "python", "--workers", "2"]),
            ("haproxy", hx_port, hx_admin, ["--engine", "haproxy", "--workers", "1"]),
        ):
            if name not in chosen:
                continue
            cmd = [sys.executable, "-m", "rollout.cli", "gateway", "--route",
                   f"/=http://127.0.0.1:{up_port}", *extra, "--port", str(port),
                   "--admin-port", str(admin), "--log-level", "WARNING"]  # fmt: skip
            gateways[name] = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
            procs.append(gateways[name])  # fmt: skip
        ports_of = {"direct": up_port, "nginx": proxy_port, "raygate": rg_port,
                    "raygate2": rg2_port, "haproxy": hx_port}  # fmt: skip
        targets = {t: f"http://127.0.0.1:{port}/svc" for t, port in ports_of.items()
                   if t in ("direct", "nginx", *chosen)}  # fmt: skip
        # Whose CPU time a row counts: the proxy's process tree (the upstream's for direct).
        pids = {"direct": procs[0].pid, "nginx": procs[1].pid,
                **{name: g.pid for name, g in gateways.items()}}  # fmt: skip
        for target in targets:
            wait_port(ports_of[target])
        post = work / "post.lua"
        post.write_text(POST_LUA)
        cases = [(CASES[c][0], CASES[c][1], post if CASES[c][2] else None) for c in picked]
        for url in targets.values():  # warm up connections, JIT-free but caches and pools
            wrk(url, 32, 1, None)
        samples: dict[tuple[str, str, int], list[Result]] = {}
        rss: list[float] = []
        for rnd in range(args.rounds):
            for method, conns, script in cases:
                # Every other round runs the targets in reverse, so none is always first.
                order = list(targets.items())
                for target, url in order if rnd % 2 == 0 else reversed(order):
                    res = wrk(url, conns, args.seconds, script, pids[target])
                    samples.setdefault((target, method, conns), []).append(res)
                    if target == "raygate":
                        rss.append(rss_mb(gateways["raygate"].pid))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        report(samples, rss, args, list(targets), [(m, c) for m, c, _ in cases])
    finally:
        for p in procs:  # nginx stops gracefully on SIGQUIT, raygate on SIGTERM
            p.send_signal(signal.SIGQUIT if p in procs[:2] else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(samples: dict[tuple[str, str, int], list[Result]], rss: list[float],
           args: argparse.Namespace, targets: list[str],
           cases: list[tuple[str, int]]) -> None:  # fmt: skip
    def med(target: str, method: str, conns: int) -> Result:
        rs = samples[(target, method, conns)]
        return Result(statistics.median(r.rps for r in rs),
                      statistics.median(r.p50_ms for r in rs),
                      statistics.median(r.p99_ms for r in rs))  # fmt: skip

    def paired(target: str, base: str, method: str, conns: int) -> float:
        """Median over rounds of target/base, each ratio taken within one round."""
        pairs = zip(samples[(target, method, conns)], samples[(base, method, conns)], strict=True)
        return statistics.median(t.rps / b.rps for t, b in pairs)

    print(f"\nmedians of {args.rounds} interleaved rounds of {args.seconds:g}s, wrk -t1, "
          f"loopback, {os.cpu_count()} cores shared by wrk, proxies and upstream; "
          "ratios are medians of per-round ratios\n")  # fmt: skip
    print(f"{'case':<16}{'target':<9}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'vs direct':>11}{'vs nginx':>10}  per round vs nginx")  # fmt: skip
    for method, conns in cases:
        for target in targets:
            r = med(target, method, conns)
            rounds = zip(samples[(target, method, conns)], samples[("nginx", method, conns)],
                         strict=True)  # fmt: skip
            each = " ".join(f"{t.rps / n.rps:.0%}" for t, n in rounds)
            case = f"{method} c{conns}"
            print(f"{case:<16}{target:<9}{r.rps:>10,.0f}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}"
                  f"{paired(target, 'direct', method, conns):>10.1%}"
                  f"{paired(target, 'nginx', method, conns):>10.1%}  {each}")  # fmt: skip

    def cpu_ratio(target: str, method: str, conns: int) -> float:
        """Median over rounds of nginx's CPU per request over the target's: the share of
        nginx's requests per core the target would serve with a core to itself."""
        pairs = zip(samples[(target, method, conns)], samples[("nginx", method, conns)],
                    strict=True)  # fmt: skip
        return statistics.median(n.cpu_us_per_request / t.cpu_us_per_request for t, n in pairs)

    print(
        "\nCPU per request (user + system, the proxy's whole process tree; direct: the "
        "upstream's), medians; capacity = nginx's CPU per request / the target's"
    )
    print(f"{'case':<16}{'target':<9}{'us/request':>11}{'capacity vs nginx':>19}")
    for method, conns in cases:
        for target in targets:
            if target == "direct":
                continue
            us = statistics.median(r.cpu_us_per_request for r in samples[(target, method, conns)])
            print(f"{method + ' c' + str(conns):<16}{target:<9}{us:>11.1f}"
                  f"{cpu_ratio(target, method, conns):>18.1%}")  # fmt: skip
    for method, conns in cases:
        if conns != 1:
            continue
        d = med("direct", method, 1)
        added = ", ".join(f"{t} +{med(t, method, 1).p50_ms - d.p50_ms:.3f} ms"
                          for t in targets if t != "direct")  # fmt: skip
        print(f"\nadded p50 at 1 connection, {method}: {added}")
    if rss:
        print(f"raygate gateway RSS (one worker): max {max(rss):.0f} MB over the run")


if __name__ == "__main__":
    raise SystemExit(main())
