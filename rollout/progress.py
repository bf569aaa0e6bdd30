"""How `raygate push --wait` and `raygate status --watch` show a rollout as it goes.

Three ways, chosen once (`choose_mode`):
- live: stdout is a terminal. A `rich` view redrawn in place: the rollout's steps with a
  spinner on the current one (a bar for the canary's steps), the health streak, elapsed
  time, traffic share per cluster as bars, the canary's analysis.
- plain: stdout is a pipe or a file (CI). One line per service each time its state changed
  (`summary`), never a repeat: a log a person or `grep` can read.
- json: `--json`. One JSON document per line (JSON Lines): the service's status, as
  `GET /v1/services/{name}` returns it, each time it changed; the last line is the state the
  command ended on. What changes by itself every second (in-flight counts, how long a
  dashboard has been unreachable) does not count as a change.

The views are pure functions of a status document (rollout/api.py `_status`), so they are
tested without a terminal; `Progress` only chooses and writes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

Status = dict[str, Any]


class Mode(StrEnum):
    LIVE = "live"
    PLAIN = "plain"
    JSON = "json"


def choose_mode(want_json: bool, out: TextIO) -> Mode:
    if want_json:
        return Mode.JSON
    return Mode.LIVE if out.isatty() else Mode.PLAIN


class Done(StrEnum):
    DONE = "done"
    CURRENT = "current"
    TODO = "todo"


@dataclass(frozen=True)
class StepView:
    label: str
    state: Done
    detail: str = ""  # what the current step waits for, in words
    bar: tuple[int, int] | None = None  # (done, of): the canary's steps


def _first_line(text: str | None, width: int = 100) -> str:
    return text.splitlines()[0][:width] if text else ""


def canary_detail(p: Status) -> tuple[str, tuple[int, int] | None]:
    """A canary under way, in words (its step, its weight, whether and why it holds), and
    its steps done as (done, of) for a bar; `raygate status` prints the same words."""
    step = p.get("canary_step")
    if step is None:
        where, bar = "every step done", None
    else:
        s = step["step"]
        if "weight" in s:
            what = f"weight {s['weight']}%"
        elif s.get("pause", {}).get("duration_s") is not None:
            what = f"pause {s['pause']['duration_s']:g}s"
        else:
            what = "pause until promoted"
        where, bar = f"step {step['index']}/{step['of']} ({what})", (step["index"] - 1, step["of"])
    text = f"{where}, weight now {p.get('weight', 0)}%"
    hold = p.get("hold")
    if hold == "user":
        text += ", PAUSED by `raygate pause`"
    elif hold == "no_data":
        text += ", PAUSED: not enough traffic to judge"
    elif p.get("paused"):
        text += ", PAUSED: waiting for `raygate promote`"
    return text, bar


def analysis_text(a: Status | None) -> str:
    if not a:
        return ""
    result = a.get("result") or "not judged yet"
    return f"{result}: {a.get('message', '')} (failed {a['failures']}, no data " \
        f"{a['inconclusive']} in a row)"  # fmt: skip


def steps(s: Status) -> list[StepView]:
    """The pending rollout's steps, in order, with where it stands: [] when none is under
    way. A new cluster: start it, deploy and pass health checks, the canary's steps (a canary
    only), then the switch; in place: deploy, health checks, live."""
    p = s.get("pending")
    if not p:
        return []
    cluster, step = p["cluster"], p["step"]
    health = f"{p.get('healthy_streak', 0)} OK in a row"
    message = _first_line(p.get("message"))
    if message:
        health += f"; {message}"
    rows: list[tuple[str, str, str, tuple[int, int] | None]] = []  # (step, label, detail, bar)
    if p["kind"] == "in_place":
        rows.append(("deploy", f"deploy the Serve config on {cluster} (in place)", "", None))
        rows.append(("health", "pass health checks", health, None))
        rows.append(("switch", "live", "", None))
    else:
        rows.append(("create_cluster", f"start cluster {cluster}", message, None))
        rows.append(("health", "deploy the Serve apps, pass health checks", health, None))
        if p.get("strategy") == "canary":
            detail, bar = canary_detail(p)
            rows.append(("canary", "canary steps", detail, bar))
            rows.append(("switch", f"all traffic on {cluster}", "", None))
        else:
            rows.append(("switch", f"switch traffic to {cluster}", "", None))
    names = [r[0] for r in rows]
    current = names.index("health") if step == "deploy" and "deploy" not in names else (
        names.index(step) if step in names else 0
    )  # fmt: skip
    out = []
    for i, (_name, label, detail, bar) in enumerate(rows):
        state = Done.DONE if i < current else Done.CURRENT if i == current else Done.TODO
        out.append(StepView(label, state, detail if state is Done.CURRENT else "", bar))
    return out


def _traffic(s: Status) -> str:
    return ", ".join(f"{c}={w}%" for c, w in (s.get("traffic") or {}).items()) or "-"


def summary(s: Status) -> str:
    """One line that changes only when the service's state does (no clock in it)."""
    p = s.get("pending")
    head = f"{s['name']} {s['phase']}"
    if p:
        current = next((v for v in steps(s) if v.state is Done.CURRENT), None)
        what = f"{current.label}: {current.detail}" if current and current.detail else (
            current.label if current else p["step"]
        )  # fmt: skip
        line = f"{head} r{p['revision']}: {what}"
        a = analysis_text(p.get("analysis")) if p.get("step") == "canary" else ""
        if a:
            line += f"; analysis {a}"
    else:
        active = s.get("active")
        line = f"{head}: r{active['revision']} on {active['cluster']}" if active else head
        lr = s.get("last_rollout")
        if lr and lr.get("result") not in (None, "succeeded"):
            line += f"; last rollout r{lr['revision']} {lr['result']}: {_first_line(lr['message'])}"
        if s.get("waiting"):
            line += f"; waiting: {_first_line(s['waiting'])}"
    for d in s.get("degraded") or []:
        line += f"; degraded: {d['cluster']}"
    return f"{line}; traffic {_traffic(s)}"


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, sec = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


_MARK = {Done.DONE: Text("✓", style="green"), Done.TODO: Text("·", style="dim")}


def view(s: Status, now: float, spinner: Spinner | None = None) -> RenderableType:
    """The live view of one service at `now` (for the elapsed time). `spinner`: the one
    kept from the view before, so it turns on instead of starting over at each poll."""
    p = s.get("pending")
    head = Text.assemble((s["name"], "bold"), "  ", (s["phase"], _phase_style(s["phase"])))
    if p:
        how = p["kind"].replace("_", " ") + (", canary" if p.get("strategy") == "canary" else "")
        head.append(f"  r{p['revision']} on {p['cluster']} ({how})")
        head.append(f"  elapsed {_elapsed(now - p['started_at'])}", style="cyan")
    elif s.get("active"):
        head.append(f"  r{s['active']['revision']} on {s['active']['cluster']}")
    parts: list[RenderableType] = [head]
    grid = Table.grid(padding=(0, 1))
    for v in steps(s):
        current = v.state is Done.CURRENT
        mark: RenderableType = (spinner or Spinner("dots")) if current else _MARK[v.state]
        label = Text(v.label, style="dim" if v.state is Done.TODO else "")
        if v.detail:
            label.append(f"  {v.detail}", style="yellow")
        bar: RenderableType = Text("") if v.bar is None else ProgressBar(
            total=v.bar[1], completed=v.bar[0], width=20, complete_style="green",
            finished_style="green",
        )  # fmt: skip
        grid.add_row(Text(" "), mark, label, bar)
    if grid.row_count:
        parts.append(grid)
    if p and p.get("step") == "canary" and p.get("analysis"):
        parts.append(Text(f"  analysis: {analysis_text(p['analysis'])}"))
    lr = s.get("last_rollout")
    if not p and lr and lr.get("result") not in (None, "in_progress"):
        style = "green" if lr["result"] == "succeeded" else "red"
        parts.append(Text(f"  last rollout r{lr['revision']} {lr['result']}: "
                          f"{_first_line(lr['message'])}", style=style))  # fmt: skip
    if s.get("waiting"):
        parts.append(Text(f"  waiting: {_first_line(s['waiting'])}", style="yellow"))
    for d in s.get("degraded") or []:
        parts.append(Text(f"  degraded: {d['cluster']}: {d['message']}", style="red"))
    traffic = Table.grid(padding=(0, 1))
    for cluster, weight in (s.get("traffic") or {}).items():
        bar = ProgressBar(total=100, completed=weight, width=30, complete_style="blue",
                          finished_style="blue")  # fmt: skip
        traffic.add_row(Text("  traffic" if not traffic.row_count else ""), Text(cluster), bar,
                        Text(f"{weight:>3}%"))  # fmt: skip
    if traffic.row_count:
        parts.append(traffic)
    return Group(*parts)


def _phase_style(phase: str) -> str:
    return {"live": "green", "failed": "red", "deleting": "dim"}.get(phase, "yellow")


def _stable(s: Status) -> str:
    """The status without what changes by itself: in-flight counts, ages in messages."""
    keep = {k: v for k, v in s.items() if k != "in_flight"}
    keep["retiring"] = [{k: v for k, v in r.items() if k != "in_flight"}
                        for r in s.get("retiring") or []]  # fmt: skip
    keep["degraded"] = [{k: v for k, v in d.items() if k != "message"}
                        for d in s.get("degraded") or []]  # fmt: skip
    return json.dumps(keep, sort_keys=True)


class Progress:
    """Writes successive statuses to `out` in one mode: `show` after each poll, `close` at
    the end (a live view stays on the screen as it last was)."""

    def __init__(self, mode: Mode, out: TextIO | None = None, console: Console | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.mode = mode
        self.out = out or sys.stdout
        self.clock = clock
        self._last: dict[str, str] = {}
        self._spinners: dict[str, Spinner] = {}
        self._live: Live | None = None
        if mode is Mode.LIVE:
            self._live = Live(console=console or Console(file=self.out),
                              refresh_per_second=8, transient=False)  # fmt: skip
            self._live.start()

    def show(self, statuses: Sequence[Status]) -> None:
        if self._live is not None:
            now = self.clock()
            views: list[RenderableType] = []
            for s in statuses:
                if views:
                    views.append(Text(""))  # a blank line between services
                views.append(view(s, now, self._spinners.setdefault(s["name"], Spinner("dots"))))
            body = Group(*views) if views else Text("no services")
            self._live.update(body, refresh=True)
            return
        for s in statuses:
            text = _stable(s) if self.mode is Mode.JSON else summary(s)
            if self._last.get(s["name"]) == text:
                continue
            self._last[s["name"]] = text
            if self.mode is Mode.JSON:
                self.out.write(json.dumps(s) + "\n")
            else:
                self.out.write(f"{time.strftime('%H:%M:%S', time.localtime(self.clock()))} "
                               f"{summary(s)}\n")  # fmt: skip
        self.out.flush()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
