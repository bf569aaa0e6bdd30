"""`raygate diff SPEC`: what a push of SPEC would do, from the admin API's plan preview
(`POST /v1/services/{name}/plan`), without doing it.

Exit codes as diff(1)'s: 0 nothing would change, 1 something would, 2 trouble (an invalid
spec, found here or by the server, with the errors naming the fields; a route conflict; no
answer). Kept apart from cli.py: it only prints what the server decided.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx
import yaml

from rollout.spec import SpecError, load_spec_file

CHANGE_WORDS = {"none": "no change", "in_place": "in place", "new_cluster": "new cluster"}
MARKS = {"added": "+", "removed": "-", "changed": "~"}
# ANSI colours of a unified diff's lines, as git's defaults.
_COLOURS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m"}
_BOLD, _RESET = "\033[1m", "\033[0m"


def read_spec(path: Path) -> dict[str, Any]:
    """The spec file as a push sends it: checked here first (the server checks again), with
    `cluster.code_dir` made absolute (relative paths are relative to the file). SpecError or
    OSError when it cannot be read or is invalid."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError([("", f"{path} is not valid YAML: {exc}")]) from None
    except UnicodeDecodeError as exc:  # a traceback would exit 1: "a push would change"
        raise SpecError([("", f"{path} is not UTF-8 text: {exc}")]) from None
    load_spec_file(path)
    code_dir = (raw.get("cluster") or {}).get("code_dir")
    if code_dir and not Path(code_dir).is_absolute():
        raw["cluster"]["code_dir"] = str((path.parent / code_dir).resolve())
    assert isinstance(raw, dict)  # load_spec_file refused anything else
    return raw


def diff(args: argparse.Namespace, client: httpx.Client, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # read now: a test (or a caller) may have replaced it
    try:
        raw = read_spec(args.spec)
    except SpecError as exc:
        print(f"raygate: invalid spec {args.spec}:", file=sys.stderr)
        for field, message in exc.problems:
            print(f"  - {field}: {message}" if field else f"  - {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"raygate: cannot read {args.spec}: {exc}", file=sys.stderr)
        return 2
    if args.service:
        raw["name"] = args.service  # the same spec, previewed as another service
    try:
        resp = client.post(f"/v1/services/{raw['name']}/plan", json=raw)
    except httpx.HTTPError as exc:
        print(f"raygate: no answer from {client.base_url}: {exc}", file=sys.stderr)
        return 2
    if resp.status_code != 200:
        _refused(resp)
        return 2
    colour = out.isatty() and not os.environ.get("NO_COLOR")
    try:
        plan: dict[str, Any] = resp.json()
        text = "".join(render(plan, colour))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Another server at that address (the gateway's port, a proxy): a traceback would
        # exit 1, "a push would change something".
        print(f"raygate: {client.base_url} answered, but not a plan: {exc!r}", file=sys.stderr)
        return 2
    out.write(text)
    return 0 if plan["change"] == "none" else 1


def _refused(resp: httpx.Response) -> None:
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text}
    print(f"raygate: {body.get('detail', 'error')} ({resp.status_code})", file=sys.stderr)
    for err in body.get("errors") or []:
        text = f"{err['field']}: {err['message']}" if isinstance(err, dict) else str(err)
        print(f"  - {text}", file=sys.stderr)


def render(plan: dict[str, Any], colour: bool = False) -> list[str]:
    """The preview as lines of text: the change and why, the strategy, the applications and
    deployments that change, the Serve config's unified diff."""
    bold, reset = (_BOLD, _RESET) if colour else ("", "")
    live = plan["live_revision"]
    against = f"live revision {live}" if live is not None else "no live revision"
    lines = [f"{bold}{plan['name']}: {CHANGE_WORDS[plan['change']]}{reset} (against {against})\n"]
    lines += [f"  - {reason}\n" for reason in plan["reasons"]]
    strategy = plan.get("strategy")
    if strategy is not None:
        lines.append(f"strategy: {_strategy(strategy)}\n")
    if plan["applications"]:
        lines.append("applications:\n")
    for app in plan["applications"]:
        lines.append(f"  {MARKS[app['change']]} {app['name']} ({app['change']})\n")
        lines += [f"      {MARKS[d['change']]} deployment {d['name']} ({d['change']})\n"
                  for d in app["deployments"]]  # fmt: skip
    if plan["serve_diff"]:
        lines.append("serve config:\n")
        for line in plan["serve_diff"].splitlines(keepends=True):
            header = line.startswith(("+++", "---"))
            code = _COLOURS.get(line[:1]) if colour and not header else None
            lines.append(f"{code}{line.rstrip(chr(10))}{reset}\n" if code else line)
    return lines


def _strategy(s: dict[str, Any]) -> str:
    probes = f"{s['probes']} probe" + ("" if s["probes"] == 1 else "s")
    gate = (f"health gate: {s['consecutive_successes']} passes in a row within "
            f"{s['health_timeout_s']:g}s, {probes}")  # fmt: skip
    if s["name"] == "in_place":
        return f"in place (the live cluster's Serve config is updated; {gate})"
    text = f"{s['name']} on a new cluster ({gate}"
    if s["steps"]:
        steps = ", ".join(f"{st['weight']}%" if "weight" in st else _pause(st["pause"])
                          for st in s["steps"])  # fmt: skip
        text += f"; steps {steps}"
    if s["bake_s"]:
        text += f"; bake {s['bake_s']:g}s"
    return text + ")"


def _pause(pause: dict[str, Any]) -> str:
    return f"pause {pause['duration_s']:g}s" if pause.get("duration_s") else "pause until promote"
