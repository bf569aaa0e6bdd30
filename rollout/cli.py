"""The `raygate` command: `up` runs everything in the foreground, `down` tears down what an
`up --on-exit keep` left; `push`, `diff`, `status`, `history`, `delete` and the canary commands
(`promote`, `abort`, `pause`, `resume`, `rollback`) talk to the admin API with httpx."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.routes import route_prefix_problem
from rollout.progress import Mode, Progress, canary_detail, choose_mode
from rollout.spec import SpecError, load_spec_file, webhook_url_problem

DEFAULT_ADMIN = "http://127.0.0.1:8001"
DEFAULT_STATE = ".raygate"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
    except httpx.TransportError as exc:  # a client command, and raygate is not there
        url = getattr(args, "admin_url", "the admin API")
        print(f"raygate: cannot reach {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `raygate status --watch | head -1`: the reader left, which is no error of ours.
        # Python would complain again flushing stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a pipeline's writer
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raygate", description=__doc__)
    sub = p.add_subparsers()

    up = sub.add_parser("up", help="run controller and gateway in the foreground")
    up.add_argument("specs", nargs="*", type=Path, metavar="SPEC")
    up.add_argument("--host", default="127.0.0.1", help="data plane host")
    up.add_argument("--port", type=int, default=8000, help="data plane port")
    up.add_argument(
        "--admin-host", default="127.0.0.1",
        help="admin API host; its token grants code execution on this machine (README: Security)",
    )  # fmt: skip
    up.add_argument("--admin-port", type=int, default=8001)
    up.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE))
    up.add_argument(
        "--engine",
        choices=["haproxy", "python"],
        default="haproxy",
        help="data plane: the HAProxy that ray[serve] ships (default), or python",
    )
    up.add_argument(
        "--on-exit",
        choices=["teardown", "keep"],
        default="teardown",
        help="on SIGTERM/SIGINT: stop every cluster and the data plane (teardown, default), "
        "or stop only raygate and leave them serving for the next `raygate up` (keep)",
    )
    up.add_argument(
        "--provider", choices=["local", "kuberay"], default="local",
        help="where clusters run: Ray heads on this machine (local, default), or RayClusters "
        "on Kubernetes through the KubeRay operator (kuberay; clusters outlive raygate)",
    )  # fmt: skip
    up.add_argument("--namespace", help="kuberay: the namespace of the RayClusters "
                    "(default: the pod's own, else `default`)")  # fmt: skip
    up.add_argument("--kubeconfig", help="kuberay: else in-cluster config, $KUBECONFIG, "
                    "~/.kube/config, as kubectl")  # fmt: skip
    up.add_argument("--instance", help="kuberay: the label value that tells this raygate's "
                    "RayClusters from another's in the same namespace (default: an id made "
                    "once per state dir, kept in <state-dir>/instance)")  # fmt: skip
    up.add_argument("--webhook", action="append", default=[], metavar="URL",
                    help="POST every rollout event there (repeatable); signed with the secret "
                    "in $RAYGATE_WEBHOOK_SECRET or --webhook-secret-file, if any")  # fmt: skip
    up.add_argument("--webhook-secret-file", type=Path, metavar="PATH",
                    help="file holding the webhook signing secret (not on the command line: "
                    "argv is visible to every user)")  # fmt: skip
    up.add_argument("--log-level", default="INFO")
    up.set_defaults(func=_up)

    down = sub.add_parser(
        "down", help="tear down the clusters and HAProxy a raygate left (`up --on-exit keep`)"
    )
    down.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE))
    down.add_argument("--log-level", default="INFO")
    down.set_defaults(func=_down)

    gw = sub.add_parser(
        "gateway", help="only the data plane, in front of endpoints raygate did not start"
    )
    gw.add_argument(
        "--route",
        action="append",
        required=True,
        metavar="/PREFIX=URL",
        help="route a prefix to an upstream; repeat a prefix to balance",
    )
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--admin-port", type=int, default=8001, help="/metrics and /-/healthz")
    gw.add_argument("--timeout", type=float, default=60.0, help="per-route upstream timeout")
    gw.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    gw.add_argument(
        "--engine",
        choices=["haproxy", "python"],
        default="haproxy",
        help="data plane: the HAProxy that ray[serve] ships (default), or python",
    )
    gw.add_argument(
        "--workers",
        type=int,
        default=1,
        help="python engine: processes sharing the data port; haproxy engine: threads",
    )
    gw.add_argument("--log-level", default="INFO")
    gw.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # an extra worker
    gw.set_defaults(func=_gateway)

    def client(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--admin-url", default=os.environ.get("RAYGATE_ADMIN_URL", DEFAULT_ADMIN))
        sp.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE))

    push = sub.add_parser("push", help="push a spec (YAML or JSON file)")
    push.add_argument("spec", type=Path)
    push.add_argument("--wait", action="store_true", help="wait until live (0), aborted (1), "
                      "or a canary held for a person (3: promote or abort it)")  # fmt: skip
    push.add_argument("--timeout", type=float, default=900.0)
    push.add_argument("--json", action="store_true", help="JSON Lines on stdout: the answer "
                      "to the push, then (--wait) the status at each change")  # fmt: skip
    client(push)
    push.set_defaults(func=_push)

    diff = sub.add_parser("diff", help="what a push of SPEC would do, against the live "
                          "revision (exit 0: nothing, 1: a change, 2: invalid spec)")  # fmt: skip
    diff.add_argument("spec", type=Path)
    diff.add_argument("--service", metavar="NAME",
                      help="preview the spec as service NAME (its `name` replaced)")  # fmt: skip
    client(diff)
    diff.set_defaults(func=_diff)

    status = sub.add_parser("status", help="show services")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true", help="with --watch: one status per "
                        "line (JSON Lines) at each change")  # fmt: skip
    status.add_argument("--watch", action="store_true", help="follow it (Ctrl-C ends): a live "
                        "view on a terminal, a line per change otherwise")  # fmt: skip
    client(status)
    status.set_defaults(func=_status)

    history = sub.add_parser("history", help="every revision of a service")
    history.add_argument("name")
    client(history)
    history.set_defaults(func=_history)

    delete = sub.add_parser("delete", help="drain and tear down a service")
    delete.add_argument("name")
    client(delete)
    delete.set_defaults(func=_delete)

    for kind, text in (
        ("promote", "a canary: on to its next step (or, with --full, past every step left)"),
        ("abort", "stop the rollout in progress: all traffic back on the stable cluster"),
        ("pause", "hold a canary at its step and weight until `raygate resume`"),
        ("resume", "go on with a canary held by `raygate pause` or for lack of data"),
        ("rollback", "bring back the previous good revision (or --to REVISION) as a new one"),
    ):
        cmd = sub.add_parser(kind, help=text)
        cmd.add_argument("name")
        if kind == "promote":
            cmd.add_argument("--full", action="store_true", help="skip every remaining step")
        if kind == "rollback":
            cmd.add_argument("--to", type=int, metavar="REVISION")
        client(cmd)
        cmd.set_defaults(func=_command, kind=kind)
    return p


# ---- up ------------------------------------------------------------------------------
def _up(args: argparse.Namespace) -> int:
    from rollout.server import (  # imported here: keeps `raygate status` light
        SpecConflict,
        StartFailed,
        UpSettings,
        WeakToken,
        run_up,
    )
    from rollout.statedir import StateDirBusy

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per probe request is noise; raygate logs what it decided instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        specs = [load_spec_file(p) for p in args.specs]
    except (SpecError, OSError) as exc:
        print(f"raygate: invalid spec: {exc}", file=sys.stderr)
        return 2
    try:
        webhook_secret = _webhook_secret(args)
    except ValueError as exc:
        print(f"raygate: {exc}", file=sys.stderr)
        return 2
    settings = UpSettings(
        webhooks=tuple(args.webhook),
        webhook_secret=webhook_secret,
        engine=args.engine,
        state_dir=args.state_dir,
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        token=os.environ.get("RAYGATE_TOKEN") or None,
        admin_host=args.admin_host,
        on_exit=args.on_exit,
        provider=args.provider,
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        instance=args.instance,
    )
    try:
        return _run(run_up(settings, specs))
    except (StateDirBusy, SpecConflict, WeakToken, StartFailed) as exc:
        print(f"raygate: {exc}", file=sys.stderr)
        return 2


def _webhook_secret(args: argparse.Namespace) -> str | None:
    """`up`'s webhook signing secret (None: unsigned), having checked its --webhook URLs.
    Raises ValueError saying which argument is wrong."""
    for url in args.webhook:
        why = webhook_url_problem(url)
        if why is not None:
            raise ValueError(f"--webhook {url!r}: {why}")
    secret = os.environ.get("RAYGATE_WEBHOOK_SECRET") or None
    if args.webhook_secret_file is not None:
        try:
            secret = args.webhook_secret_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"--webhook-secret-file: {exc}") from None
        if not secret:
            raise ValueError(f"--webhook-secret-file: {args.webhook_secret_file} is empty")
    return secret


def _down(args: argparse.Namespace) -> int:
    from rollout.server import run_down
    from rollout.statedir import StateDirBusy

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(run_down(args.state_dir.resolve()))
    except StateDirBusy as exc:
        print(f"raygate: {exc}", file=sys.stderr)
        return 1


def _gateway(args: argparse.Namespace) -> int:
    routes = []
    for item in args.route:
        prefix, sep, url = item.partition("=")
        if not sep or not prefix.startswith("/") or not url.startswith(("http://", "https://")):
            print(f"raygate: --route {item!r}: expected /PREFIX=http://HOST:PORT", file=sys.stderr)
            return 2
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else "/"
        problem = route_prefix_problem(prefix)
        if problem is not None:
            print(f"raygate: --route {item!r}: the prefix {problem}", file=sys.stderr)
            return 2
        routes.append((prefix, url))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    metrics_dir = None
    extra: list[str] = []
    if args.workers < 1:
        print("raygate: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.engine == "python" and args.workers > 1 and not args.worker:
        # Before anything imports prometheus_client: every worker writes its metrics here.
        import tempfile

        metrics_dir = tempfile.mkdtemp(prefix="rg-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        extra = [sys.executable, "-m", "rollout.cli", *sys.argv[1:], "--worker"]
    from rollout.server import GatewayOnlySettings, run_gateway

    settings = GatewayOnlySettings(
        routes=tuple(routes), host=args.host, port=args.port, admin_port=args.admin_port,
        timeout_s=args.timeout, max_body_bytes=args.max_body_bytes, workers=args.workers,
        serve_admin=not args.worker, engine=args.engine,
    )  # fmt: skip
    try:
        return _run(run_gateway(settings, extra))
    finally:
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(main: Any) -> int:
    import gc

    import uvloop

    # What is loaded at start lives forever: keep it out of every collection, and collect
    # the young generation less often. Measured: p99 at 32 connections 50 ms -> 9-15 ms.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code: int = runner.run(main)
        return code


# ---- admin API clients -----------------------------------------------------------------
def _client(args: argparse.Namespace) -> httpx.Client:
    token = os.environ.get("RAYGATE_TOKEN")
    if not token:
        path = args.state_dir / "token"
        try:
            token = path.read_text().strip()
        except OSError:
            raise SystemExit(f"raygate: no RAYGATE_TOKEN and no token at {path}") from None
    return httpx.Client(
        base_url=args.admin_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30.0,
        trust_env=False,
    )


def _fail(resp: httpx.Response) -> int:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if isinstance(body, dict) and body.get("errors"):
        print(f"raygate: {body.get('detail', 'error')} ({resp.status_code}):", file=sys.stderr)
        for err in body["errors"]:
            text = f"{err['field']}: {err['message']}" if isinstance(err, dict) else err
            print(f"  - {text}", file=sys.stderr)
    elif isinstance(body, dict) and isinstance(body.get("detail"), str):
        # The server's words, as the canary commands print them; not a Python dict's repr
        print(f"raygate: {body['detail']} ({resp.status_code})", file=sys.stderr)
    else:
        print(f"raygate: {resp.status_code}: {body}", file=sys.stderr)
    return 1


def _push(args: argparse.Namespace) -> int:
    try:
        raw = yaml.safe_load(args.spec.read_text())
        load_spec_file(args.spec)  # same checks as the server, with paths relative to the file
    except (SpecError, OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        print(f"raygate: invalid spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    code_dir = (raw.get("cluster") or {}).get("code_dir")
    if code_dir and not Path(code_dir).is_absolute():
        raw["cluster"]["code_dir"] = str((args.spec.parent / code_dir).resolve())
    with _client(args) as client:
        resp = client.put(f"/v1/services/{raw['name']}", json=raw)
        if resp.status_code not in (200, 202):
            return _fail(resp)
        out = resp.json()
        # With --json, stdout carries JSON only: the words go to stderr.
        say = sys.stderr if args.json else sys.stdout
        if args.json:
            print(json.dumps(out), flush=True)
        if out.get("unchanged"):
            print(f"{out['name']}: {out['message']}", file=say, flush=True)
            if not args.wait:
                return 0
            # With --wait, the revision it is identical to decides: live 0, aborted 1, under
            # way: wait for it (a CI job retried after an abort must not pass).
        else:
            print(f"{out['name']}: revision {out['revision']} pushed", file=say, flush=True)
        if not args.wait:
            return 0
        mode = choose_mode(args.json, sys.stdout)
        return _wait(client, out["name"], out["revision"], args.timeout, Progress(mode))


def _wait(
    client: httpx.Client, name: str, revision: int, timeout: float,
    progress: Progress | None = None,
) -> int:  # fmt: skip
    """Poll until revision `revision` is live (0), aborted or superseded (1, also on a
    timeout), or a canary held for a person (3); `progress` shows the way there."""
    progress = progress or Progress(choose_mode(False, sys.stdout))
    say = sys.stderr if progress.mode is Mode.JSON else sys.stdout
    try:
        with progress:
            code, why = _wait_for(client, name, revision, timeout, progress)
    except KeyboardInterrupt:
        code, why = 130, f"{name}: stopped waiting; the rollout goes on (`raygate status {name}`)"
    if code == 0:
        print(why, file=say)
    elif why:
        print(why, file=sys.stderr)
    return code


def _wait_for(
    client: httpx.Client, name: str, revision: int, timeout: float, progress: Progress
) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    poll = _Poll(client)
    while time.monotonic() < deadline:
        resp = poll.get(f"/v1/services/{name}")
        if resp is None:  # raygate restarts: the rollout goes on without it, so does the wait
            time.sleep(1.0)
            continue
        if resp.status_code != 200:
            progress.close()
            return _fail(resp), ""
        s = resp.json()
        progress.show([s])
        lr = s.get("last_rollout") or {}
        if s.get("active") and s["active"]["revision"] == revision and not s.get("pending"):
            return 0, f"{name}: revision {revision} is live on {s['active']['cluster']}"
        failed = ("aborted", "superseded", "rolled_back")
        if lr.get("revision") == revision and lr.get("result") in failed:
            return 1, f"{name}: revision {revision} {lr['result']}: {lr.get('message', '')}"
        p = s.get("pending") or {}
        if p.get("revision") == revision and p.get("paused"):
            # A canary held for a person (`pause: {}`, `raygate pause`, no data): it will
            # not go live by waiting. Exit 3 tells a script "waiting for you", not "failed".
            return 3, (
                f"{name}: revision {revision} waits at weight {p.get('weight')}%: "
                f"{p.get('message') or 'paused'}; `raygate promote {name}` goes on, "
                f"`raygate abort {name}` stops it"
            )
        if p.get("revision") != revision:
            # Not under way: not started yet, or ended. A newer push (or a rollback) that
            # took its place shows its own rollout in the status, never this one's end;
            # the history has it.
            ended = _ended(poll, name, revision, s.get("desired_revision", revision))
            if ended is not None:
                return ended
        time.sleep(1.0)
    return 1, f"raygate: gave up waiting after {timeout:g}s"


def _ended(poll: _Poll, name: str, revision: int, newest: int) -> tuple[int, str] | None:
    """How `revision` ended, from the history (None: not yet, or raygate did not answer):
    1 if it failed, or if a newer revision `newest` replaced it before it went live; 0 if
    it went live before one did."""
    resp = poll.get(f"/v1/services/{name}/history")
    if resp is None or resp.status_code != 200:
        return None
    entry: dict[str, Any] = next((e for e in resp.json() if e.get("revision") == revision), {})
    result = entry.get("result")
    if result in ("aborted", "superseded", "rolled_back"):
        return 1, f"{name}: revision {revision} {result}: {entry.get('message') or ''}"
    if newest <= revision:
        return None  # (still to start, or live: the status says so)
    if result == "succeeded":
        return 0, f"{name}: revision {revision} went live; revision {newest} replaces it now"
    return 1, f"{name}: revision {revision} superseded by revision {newest}"


class _Poll:
    """The GETs of a wait or a watch. raygate that does not answer for a while (a restart,
    `up --on-exit keep`) is said once, and again when it answers: the caller polls on."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.down = False

    def get(self, path: str) -> httpx.Response | None:
        try:
            resp = self.client.get(path)
        except httpx.TransportError as exc:
            if not self.down:
                print(f"raygate: {self.client.base_url} does not answer ({type(exc).__name__}: "
                      f"{exc}); trying again", file=sys.stderr, flush=True)  # fmt: skip
                self.down = True
            return None
        if self.down:
            print(f"raygate: {self.client.base_url} answers again", file=sys.stderr, flush=True)
            self.down = False
        return resp


def _progress(s: dict[str, Any]) -> str:
    p = s.get("pending")
    if p:
        msg = (p.get("message") or "").splitlines()[0][:100] if p.get("message") else ""
        return f"{s['phase']}: revision {p['revision']} {p['step']} on {p['cluster']} {msg}"
    return f"{s['phase']}"


def _diff(args: argparse.Namespace) -> int:
    from rollout.cli_diff import diff

    try:
        client = _client(args)
    except SystemExit as exc:  # no token: trouble is 2 for `diff`, as for diff(1)
        print(exc, file=sys.stderr)
        return 2
    with client:
        return diff(args, client)


def _status(args: argparse.Namespace) -> int:
    path = f"/v1/services/{args.name}" if args.name else "/v1/services"
    with _client(args) as client:
        if args.watch:
            return _watch(client, path, Progress(choose_mode(args.json, sys.stdout)))
        resp = client.get(path)
        if resp.status_code != 200:
            return _fail(resp)
        body = resp.json()
        if args.json:
            print(json.dumps(body, indent=2))
        else:
            _print_table([body] if args.name else body)
        return 0


def _watch(client: httpx.Client, path: str, progress: Progress) -> int:
    """`status --watch` until Ctrl-C (exit 130, no traceback) or an error (1). A raygate
    that answered once and then does not (a restart) is polled on; one that never answered
    is an error."""
    poll = _Poll(client)
    with progress:
        try:
            resp: httpx.Response | None = client.get(path)
            while True:
                if resp is not None:
                    if resp.status_code != 200:
                        progress.close()
                        return _fail(resp)
                    body = resp.json()
                    progress.show(body if isinstance(body, list) else [body])
                time.sleep(1.0)
                resp = poll.get(path)
        except KeyboardInterrupt:
            return 130


def _when(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _canary_lines(p: dict[str, Any]) -> list[str]:
    """A canary under way, in words: its step, its weight, whether (and why) it holds."""
    if p.get("strategy") != "canary" or p.get("step") != "canary":
        return []
    text, _ = canary_detail(p)
    if p.get("hold") in ("user", "no_data"):
        text += " (resume, promote or abort)"
    return [f"  canary:  {text}"]


def _analysis_line(a: dict[str, Any] | None, what: str) -> list[str]:
    if not a:
        return []
    counts = f"failed {a['failures']}, no data {a['inconclusive']} in a row"
    result = a["result"] or "not judged yet"
    return [f"  {what}: {result}: {a['message']} ({counts})"]


def _print_table(services: list[dict[str, Any]]) -> None:
    if not services:
        print("no services")
    for s in services:
        active = s["active"]
        print(f"{s['name']}  phase={s['phase']}  desired=r{s['desired_revision']}")
        where = f"r{active['revision']} on {active['cluster']}" if active else "-"
        print(f"  active:  {where}")
        p = s["pending"]
        if p:
            print(f"  pending: r{p['revision']} {p['kind']} {p['step']} on {p['cluster']}")
            if p["message"]:
                print(f"           {p['message'].splitlines()[0][:120]}")
            for line in _canary_lines(p) + _analysis_line(p.get("analysis"), "analysis"):
                print(line)
        for r in s.get("retiring") or []:
            if r.get("bake_until") is not None:
                revision = f" (r{r['revision']})" if r.get("revision") is not None else ""
                print(f"  baking:  {r['cluster']}{revision} kept at weight 0 until "
                      f"{_when(r['bake_until'])}, ready to take traffic back")  # fmt: skip
        for line in _analysis_line(s.get("analysis"), "bake analysis"):
            print(line)
        lr = s["last_rollout"]
        if lr:
            first = (lr["message"] or "").splitlines()[0][:120] if lr["message"] else ""
            print(f"  last rollout: r{lr['revision']} {lr['result']} {first}")
        for d in s.get("degraded") or []:
            print(f"  degraded: {d['cluster']}: {d['message']}")
        traffic = ", ".join(f"{c}={w}%" for c, w in s["traffic"].items()) or "-"
        print(f"  traffic: {traffic}   routes: {s['routes']}")


def _history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.get(f"/v1/services/{args.name}/history")
        if resp.status_code != 200:
            return _fail(resp)
        for r in resp.json():
            pushed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["pushed_at"]))
            of = f"  rollback of r{r['rollback_of']}" if r.get("rollback_of") else ""
            print(
                f"r{r['revision']}  {pushed}  {r['spec_hash']}  {r['result']}{of}  "
                f"{(r['message'] or '').splitlines()[0][:100] if r['message'] else ''}"
            )
    return 0


def _command(args: argparse.Namespace) -> int:
    """promote/abort/pause/resume/rollback: queued for the controller's next tick (202); a
    command that does not apply now is a 409 whose reason is printed (exit 1)."""
    body: dict[str, Any] = {}
    if getattr(args, "full", False):
        body["full"] = True
    if getattr(args, "to", None) is not None:
        body["to"] = args.to
    with _client(args) as client:
        resp = client.post(f"/v1/services/{args.name}/{args.kind}", json=body)
    if resp.status_code == 409:
        print(f"raygate: {args.kind} {args.name}: {resp.json()['detail']}", file=sys.stderr)
        return 1
    if resp.status_code != 202:
        return _fail(resp)
    s = resp.json()
    if args.kind == "rollback":
        print(f"{args.name}: revision {s['revision']} brings back the spec of revision "
              f"{s['rollback_of']} (no canary steps)")  # fmt: skip
    else:
        what = "promote --full" if body.get("full") else args.kind
        print(f"{args.name}: {what} queued")
    print(f"  {_progress(s)}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.delete(f"/v1/services/{args.name}")
        if resp.status_code != 202:
            return _fail(resp)
        print(f"{args.name}: deleting (draining, then tearing down its clusters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
