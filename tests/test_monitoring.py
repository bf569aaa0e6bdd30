"""deploy/monitoring/: the Grafana dashboard and the Prometheus alert rules, checked offline.

What can rot here is invisible until someone is paged (or is not): a metric renamed in
gateway/metrics.py leaves a dashboard panel empty and an alert silent, with no error
anywhere. So every metric name in every PromQL expression is checked against raygate's own
registry; promtool (Debian's prometheus package, as ./dev test installs it) parses the rules
and the dashboard's queries, and runs the rules' unit tests, in which each alert fires on a
synthetic failure and stays quiet on healthy series beside it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "raygate-rules.yml"
RULE_TESTS = MONITORING / "raygate-rules.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
OPERATOR_RULE = MONITORING / "prometheusrule.yaml"
# Series Prometheus makes itself, not raygate, with their labels.
PROMETHEUS_OWN = {"up": {"job", "instance"}}

Doc = dict[str, Any]


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: ./dev test installs Debian's prometheus package"
    return path


# ---------------------------------------------------------------- metric names


def registry_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of `registry` can show, from each family's type (labelled
    families show no samples until a label set is used, so samples would miss them)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum", ""),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not inside label
    matchers, ranges or groupings, not a function or aggregation (followed by `(`), not a
    keyword or number. Grafana's variables (`$service`, `$__rate_interval`) are dropped."""
    text = _STRING.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGE, _VARIABLE, _GROUPING, _NUMBER):
        text = pattern.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if m.group().lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(m.group())
    return names


def unknown_names(exprs: dict[str, str], known: set[str]) -> list[str]:
    return [
        f"{where}: {name}"
        for where, expr in exprs.items()
        for name in sorted(metric_names(expr))
        if name not in known
    ]


def known_names() -> set[str]:
    return registry_names(Metrics(CollectorRegistry()).registry) | set(PROMETHEUS_OWN)


def known_labels() -> dict[str, set[str]]:
    """Series name -> its label names, for every metric a `Metrics` holds (prometheus-client
    keeps a metric's label names in `_labelnames`; `describe()` does not carry them)."""
    out = {name: set(labels) for name, labels in PROMETHEUS_OWN.items()}
    for metric in vars(Metrics(CollectorRegistry())).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        registry = CollectorRegistry()
        registry.register(metric)
        for name in registry_names(registry):
            out[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return out


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def unknown_labels(exprs: dict[str, str], labels: dict[str, set[str]]) -> list[str]:
    """Label names a query uses that its metrics do not have: in a selector's matchers (a
    typo there matches nothing, silently), or in `by`/`on`/`without`/`ignoring` (one that no
    metric of the expression has merges every series into one)."""
    problems = []
    for where, expr in exprs.items():
        text = _STRING.sub('""', expr)
        for m in _SELECTOR.finditer(text):
            for label in _MATCHER_LABEL.findall(m.group(2)):
                if label not in labels.get(m.group(1), set()):
                    problems.append(f"{where}: {m.group(1)} has no label {label}")
        anywhere = set().union(*(labels.get(n, set()) for n in metric_names(expr)))
        for group in _GROUPING.finditer(text):
            inside = group.group()[group.group().index("(") + 1 : -1]
            for label in filter(None, (x.strip() for x in inside.split(","))):
                if label not in anywhere:
                    problems.append(f"{where}: no metric of it has a label {label}")
    return problems


# ---------------------------------------------------------------- the files


def rules() -> Doc:
    loaded: Doc = yaml.safe_load(RULES.read_text())
    return loaded


def alerts() -> list[Doc]:
    return [r for g in rules()["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> Doc:
    loaded: Doc = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dash: Doc) -> Iterator[Doc]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # a collapsed row holds its panels


def dashboard_exprs(dash: Doc) -> dict[str, str]:
    """Every PromQL expression in the dashboard: panel targets, annotation queries, and the
    metric of each `label_values(metric, label)` variable query."""
    out = {}
    for p in panels(dash):
        for t in p.get("targets", []):
            out[f"panel {p['title']!r} {t.get('refId')}"] = t["expr"]
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out[f"annotation {a['name']!r}"] = a["expr"]
    for v in dash["templating"]["list"]:
        query = v.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        if m:
            out[f"variable {v['name']}"] = m.group(1)
    return out


def rule_exprs() -> dict[str, str]:
    return {r.get("alert") or r["record"]: r["expr"] for g in rules()["groups"] for r in g["rules"]}


# ---------------------------------------------------------------- metric names exist


def test_the_name_check_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (service, le) (rate(raygate_request_duration_seconds_bucket{service=~"$service", code="5.."}[$__rate_interval])))'  # noqa: E501
        " / on (service) group_left sum without (cluster) (raygate_traffic_weight offset 5m)"
        ' > bool 1e3 and time() - raygate_cluster_degraded_since_timestamp_seconds or up{job="x"}'
    )
    assert metric_names(expr) == {
        "raygate_request_duration_seconds_bucket",
        "raygate_traffic_weight",
        "raygate_cluster_degraded_since_timestamp_seconds",
        "up",
    }
    # A misspelt name (the counter without its _total suffix) is caught.
    assert unknown_names({"x": "rate(raygate_requests[5m])"}, known_names()) == [
        "x: raygate_requests"
    ]


def test_the_label_check_finds_labels_a_metric_lacks() -> None:
    labels = known_labels()
    assert labels["raygate_request_duration_seconds_bucket"] == {"service", "app", "cluster", "le"}
    assert labels["raygate_rollouts_total"] == {"service", "result"}
    good = 'sum by (service, kind) (rate(raygate_upstream_errors_total{service=~"a"}[5m]))'
    assert unknown_labels({"x": good}, labels) == []
    bad = 'sum by (service, app) (rate(raygate_upstream_errors_total{servce=~"a"}[5m]))'
    assert unknown_labels({"x": bad}, labels) == [
        "x: raygate_upstream_errors_total has no label servce",
        "x: no metric of it has a label app",
    ]


def test_every_metric_in_the_dashboard_exists_in_raygates_registry() -> None:
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) > 15
    assert unknown_names(exprs, known_names()) == []
    assert unknown_labels(exprs, known_labels()) == []


def test_every_metric_in_the_alert_rules_exists_in_raygates_registry() -> None:
    exprs = rule_exprs()
    assert len(exprs) >= 6
    assert unknown_names(exprs, known_names()) == []
    assert unknown_labels(exprs, known_labels()) == []


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Request rate, error rate and latency percentiles per service, app and cluster; traffic
    and canary weights; rollout phase and results; upstream errors by kind; analysis runs."""
    used = {name for e in dashboard_exprs(dashboard()).values() for name in metric_names(e)}
    exprs = "\n".join(dashboard_exprs(dashboard()).values())
    assert {
        "raygate_requests_total",
        "raygate_request_duration_seconds_bucket",
        "raygate_traffic_weight",
        "raygate_canary_weight",
        "raygate_rollout_phase",
        "raygate_rollouts_total",
        "raygate_upstream_errors_total",
        "raygate_analysis_runs_total",
        "raygate_cluster_healthy",
        "raygate_service_healthy_clusters",
    } <= used
    assert "sum by (service, app, cluster) (rate(raygate_requests_total" in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (service, app, cluster, le)" in exprs
    assert "sum by (service, cluster, kind) (rate(raygate_upstream_errors_total" in exprs


# ---------------------------------------------------------------- the rules


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in out.stdout


def test_promtool_unit_tests_fire_each_alert() -> None:
    out = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)],
                         capture_output=True, text=True, timeout=60, cwd=MONITORING)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_each_alert_has_a_test_that_fires_it_and_one_where_it_stays_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names == {
        "RaygateScrapeFailing",
        "RaygateMetricsAbsent",
        "RaygateRolloutAborted",
        "RaygateHighErrorRate",
        "RaygateServiceWithoutHealthyCluster",
        "RaygateClusterDegraded",
        "RaygateWebhookDeliveriesFailing",
    }
    assert names - fires == set(), "alerts no test fires"
    assert names - quiet == set(), "alerts no test shows quiet"


def test_each_alert_has_a_severity_a_summary_and_a_description() -> None:
    for a in alerts():
        assert a.get("labels", {}).get("severity") in ("critical", "warning"), a["alert"]
        notes = a.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), a["alert"]


def test_the_rules_job_matcher_matches_the_servicemonitors_job() -> None:
    """The Prometheus Operator names a ServiceMonitor's job after the Service it scrapes
    (unless `jobLabel` says otherwise): deploy/'s admin Service must match `raygate.*`."""
    from tests.test_deploy import manifests, one

    docs = manifests()
    sm = one(docs, "ServiceMonitor")
    assert "jobLabel" not in sm["spec"]
    selector = sm["spec"]["selector"]["matchLabels"]
    services = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    matchers = set(re.findall(r'up\{job=~"([^"]+)"\}', "\n".join(rule_exprs().values())))
    assert services and matchers == {"raygate.*"}
    assert all(re.fullmatch(m, s) for m in matchers for s in services), (services, matchers)


def test_the_operator_rule_carries_the_same_groups() -> None:
    rule = yaml.safe_load(OPERATOR_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == rules(), "prometheusrule.yaml differs from raygate-rules.yml"


# ---------------------------------------------------------------- the dashboard


def test_the_dashboards_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query, as recording rules, with Grafana's variables filled in."""
    fill = {"$service": ".+", "$__rate_interval": "2m", "$__interval": "1m", "$__range": "1h"}
    records = []
    for i, expr in enumerate(dashboard_exprs(dashboard()).values()):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a variable this test does not fill: {expr}"
        records.append({"record": f"dashboard:query{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    out = subprocess.run([promtool(), "check", "rules", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_is_well_formed() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["type"] == "query" and service["multi"] and service["includeAll"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert g["x"] + g["w"] <= 24 and not mine & cells, f"{p['title']} overlaps"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        targets = p.get("targets", [])
        assert targets, f"{p['title']} has no query"
        assert len({t["refId"] for t in targets}) == len(targets)
        for t in targets:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
            # Per service: everything but the scrape itself and the all-service step times.
            if "raygate_" in t["expr"] and "step_duration" not in t["expr"]:
                assert 'service=~"$service"' in t["expr"], f"{p['title']}: not per $service"


# ---------------------------------------------------------------- kubectl apply -k


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not installed")
def test_kustomize_renders_the_rule_and_the_dashboard_configmap() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING)],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert set(docs) == {"ConfigMap", "PrometheusRule"}
    cm = docs["ConfigMap"]
    kubernetes_validate.validate(cm, "1.33.0", strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["grafana-dashboard.json"]) == dashboard()
    assert docs["PrometheusRule"]["spec"] == rules()


def test_the_phase_panel_reads_each_services_phase_from_a_real_scrape(tmp_path: Path) -> None:
    """The phase timeline folds raygate_rollout_phase's 0/1 series into one number per
    service; promtool evaluates that query on series scraped from a real `Metrics`, and the
    panel's value mappings turn the number back into the phase's name."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from rollout.plan import Phase

    phases = tuple(p.value for p in Phase)
    metrics = Metrics(CollectorRegistry())
    expected = {"a": "deploying", "b": "live", "c": "upgrading", "d": "failed", "e": "deleting"}
    for service, phase in expected.items():
        metrics.set_phase(service, phase, phases)
    series = [
        {"series": s.name + "{" + ",".join(f'{k}="{v}"' for k, v in s.labels.items()) + "}",
         "values": f"{s.value:g}x5"}
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.name == "raygate_rollout_phase"
    ]  # fmt: skip
    panel = next(p for p in panels(dashboard()) if p["title"] == "Rollout phase")
    expr = panel["targets"][0]["expr"].replace("$service", ".+")
    names = {
        int(k): v["text"] for m in panel["fieldConfig"]["defaults"]["mappings"]
        for k, v in m["options"].items()
    }  # fmt: skip
    number = {name: n for n, name in names.items()}
    samples = [
        {"labels": f'{{service="{service}"}}', "value": number[phase]}
        for service, phase in expected.items()
    ]
    (tmp_path / "empty.yml").write_text("groups: []\n")
    (tmp_path / "phase.test.yml").write_text(yaml.safe_dump({
        "rule_files": ["empty.yml"],
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [
            {"expr": expr, "eval_time": "2m", "exp_samples": samples}]}],
    }))  # fmt: skip
    out = subprocess.run([promtool(), "test", "rules", "phase.test.yml"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(names.values()) == set(phases)
