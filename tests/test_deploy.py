"""deploy/ and the KubeRay example, checked offline: no Kubernetes cluster can run here.

Every manifest `kubectl apply -k deploy/` would apply is validated against Kubernetes' own
OpenAPI schemas (kubernetes-validate, strict: an unknown or misspelt field fails), at a pinned
Kubernetes version. Kinds it has no schema for (the Prometheus Operator's ServiceMonitor) are
checked here against what their CRD requires. On top of the schemas, the few things that make
the manifests raygate's: least privilege, probes on the admin port, the KubeRay provider, a
pod that runs non-root on a read-only root filesystem.

Each check is a function from manifests to a list of problems, so that the second half of this
file can feed it a broken copy and see it complain: none of these tests passes by construction.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rollout.server import UpSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DIGITS = ROOT / "serve_configs" / "digits"
# The Kubernetes version the schemas are taken from: one the KubeRay 1.7 operator supports.
K8S_VERSION = "1.33.0"

Doc = dict[str, Any]

# What the KubeRay provider needs, and nothing more (see deploy/role.yaml).
ROLE_GRANTS: dict[tuple[str, str], set[str]] = {
    ("ray.io", "rayclusters"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "services"): {"get", "list", "watch"},
}
PROBE_PATHS = {
    "startupProbe": "/-/healthz",
    "readinessProbe": "/-/ready",
    "livenessProbe": "/-/healthz",
}


# ---------------------------------------------------------------- loading, as kustomize does


def kustomization(deploy: Path = DEPLOY) -> Doc:
    loaded: Doc = yaml.safe_load((deploy / "kustomization.yaml").read_text())
    return loaded


def manifests(deploy: Path = DEPLOY) -> list[Doc]:
    """The documents of every file kustomization.yaml lists under `resources`, in order, plus
    the Secret its secretGenerator makes (with a stand-in value: the real one is never in git)."""
    kust = kustomization(deploy)
    docs: list[Doc] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((deploy / name).read_text()) if d]
    for gen in kust.get("secretGenerator", []):
        keys = [token_key(docs)]  # the key the Deployment reads; token.env is not in git
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": gen["name"],
                    "namespace": kust["namespace"],
                    "labels": kust.get("generatorOptions", {}).get("labels", {}),
                },
                "type": gen.get("type", "Opaque"),
                "data": {k: base64.b64encode(b"x" * 32).decode() for k in keys},
            }
        )
    return docs


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[Doc]) -> Doc:
    c: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return c


def env_source(docs: list[Doc], name: str) -> Doc:
    for e in container(docs).get("env", []):
        if e["name"] == name:
            src: Doc = e.get("valueFrom", {})
            return src
    return {}


def token_key(docs: list[Doc]) -> str:
    key: str = env_source(docs, "RAYGATE_TOKEN").get("secretKeyRef", {}).get("key", "")
    return key


def arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ---------------------------------------------------------------- the checks


def schema_problems(docs: list[Doc]) -> list[str]:
    """Kubernetes' schemas, strict; a kind without one must have a structural check here."""
    problems = []
    for d in docs:
        what = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            if d.get("kind") not in STRUCTURAL:
                problems.append(f"{what}: no schema, and no structural check in this test")
            else:
                problems += [f"{what}: {p}" for p in STRUCTURAL[d["kind"]](d)]
    return problems


# ServiceMonitor, from monitoring.coreos.com_servicemonitors.yaml (prometheus-operator 0.84):
# spec requires endpoints and selector; these are the endpoint fields this file may use.
SM_ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "authorization",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
SM_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$"
)


def servicemonitor_structure(sm: Doc) -> list[str]:
    problems = []
    if sm.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {sm.get('apiVersion')!r}")
    if unknown := set(sm) - {"apiVersion", "kind", "metadata", "spec"}:
        problems.append(f"unknown top-level fields {sorted(unknown)}")
    spec = sm.get("spec")
    if not isinstance(spec, dict):
        return [*problems, "spec is required"]
    if not isinstance(spec.get("selector"), dict):
        problems.append("spec.selector is required (an object)")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*problems, "spec.endpoints is required (a non-empty list)"]
    for i, ep in enumerate(endpoints):
        where = f"spec.endpoints[{i}]"
        if unknown := set(ep) - SM_ENDPOINT_FIELDS:
            problems.append(f"{where}: unknown fields {sorted(unknown)}")
        for field in ("interval", "scrapeTimeout"):
            if field in ep and not SM_DURATION.match(str(ep[field])):
                problems.append(f"{where}.{field}: {ep[field]!r} is not a duration")
        auth = ep.get("authorization")
        if auth is not None:
            creds = auth.get("credentials")
            if not isinstance(creds, dict) or "key" not in creds:
                problems.append(f"{where}.authorization.credentials.key is required")
            if str(auth.get("type", "Bearer")).lower() == "basic":
                problems.append(f"{where}.authorization.type: Basic is not supported")
    return problems


STRUCTURAL: dict[str, Callable[[Doc], list[str]]] = {"ServiceMonitor": servicemonitor_structure}


def servicemonitor_problems(docs: list[Doc]) -> list[str]:
    """It scrapes the admin Service's /metrics, with the token the Deployment gets."""
    sm = one(docs, "ServiceMonitor")
    labels = sm["spec"].get("selector", {}).get("matchLabels", {})
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and labels.items() <= d["metadata"].get("labels", {}).items()
    ]
    admin_port = arg_value(container(docs)["args"], "--admin-port")
    names = [
        p["name"] for s in services for p in s["spec"]["ports"] if str(p["port"]) == admin_port
    ]
    if len(services) != 1 or len(names) != 1:
        return [f"selects {len(services)} Services with {len(names)} ports on the admin port"]
    problems = []
    token = env_source(docs, "RAYGATE_TOKEN").get("secretKeyRef", {})
    for ep in sm["spec"]["endpoints"]:
        if ep.get("port") != names[0] or ep.get("path") != "/metrics":
            problems.append(f"endpoint {ep.get('port')}{ep.get('path')} is not admin /metrics")
        creds = ep.get("authorization", {}).get("credentials", {})
        if (creds.get("name"), creds.get("key")) != (token.get("name"), token.get("key")):
            problems.append(f"scrapes with {creds}, raygate's token is {token}")
    return problems


def listing_problems(deploy: Path = DEPLOY) -> list[str]:
    """Every manifest in deploy/ is applied by `kubectl apply -k` (none forgotten), and every
    listed one exists."""
    listed = set(kustomization(deploy)["resources"])
    present = {p.name for p in deploy.iterdir() if p.suffix in (".yaml", ".yml")}
    present.discard("kustomization.yaml")
    return [f"{n} is not in kustomization.yaml's resources" for n in sorted(present - listed)] + [
        f"{n} is listed but missing" for n in sorted(listed - present)
    ]


def probe_problems(docs: list[Doc]) -> list[str]:
    """Startup and liveness on /-/healthz, readiness on /-/ready, all on the admin port."""
    c = container(docs)
    admin = arg_value(c["args"], "--admin-port")
    by_name = {p["name"]: str(p["containerPort"]) for p in c.get("ports", [])}
    problems = []
    for probe, path in PROBE_PATHS.items():
        get = c.get(probe, {}).get("httpGet", {})
        port = by_name.get(get.get("port"), str(get.get("port")))
        if get.get("path") != path or port != admin:
            problems.append(
                f"{probe} checks {get.get('path')} on port {port}, not {path} on "
                f"the admin port {admin}"
            )
    return problems


def role_problems(docs: list[Doc]) -> list[str]:
    """The Role grants exactly ROLE_GRANTS, to the ServiceAccount the pod runs as; no
    ClusterRole at all."""
    problems = [
        f"{d['kind']}/{d['metadata']['name']}: nothing cluster-wide"
        for d in docs
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]
    role = one(docs, "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        if set(rule) - {"apiGroups", "resources", "verbs"}:
            problems.append(f"rule with {sorted(set(rule) - {'apiGroups', 'resources', 'verbs'})}")
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                granted.setdefault((group, resource), set()).update(rule.get("verbs", []))
    if granted != ROLE_GRANTS:
        problems.append(f"grants {granted}, want exactly {ROLE_GRANTS}")
    binding = one(docs, "RoleBinding")
    account = one(docs, "Deployment")["spec"]["template"]["spec"].get("serviceAccountName")
    if binding["roleRef"] != {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }:
        problems.append(f"RoleBinding refers to {binding['roleRef']}")
    subjects = [(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]]
    if subjects != [("ServiceAccount", account, role["metadata"]["namespace"])]:
        problems.append(f"RoleBinding binds {subjects}, the pod runs as {account}")
    return problems


def args_problems(docs: list[Doc]) -> list[str]:
    """`raygate up --provider kuberay` in the pod's own namespace, token from the Secret, state
    on the PersistentVolumeClaim, both planes listening beyond loopback."""
    c = container(docs)
    args, problems = c.get("args", []), []
    if args[:1] != ["up"] or arg_value(args, "--provider") != "kuberay":
        problems.append(f"args {args} do not run `raygate up --provider kuberay`")
    namespace = arg_value(args, "--namespace") or ""
    var = re.fullmatch(r"\$\((\w+)\)", namespace)
    if not var or env_source(docs, var.group(1)) != {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }:
        problems.append(f"--namespace {namespace!r} is not the pod's namespace (downward API)")
    secret = env_source(docs, "RAYGATE_TOKEN").get("secretKeyRef", {})
    if secret.get("name") not in {g["name"] for g in kustomization().get("secretGenerator", [])}:
        problems.append(f"RAYGATE_TOKEN comes from {secret}, not the generated Secret")
    for flag in ("--host", "--admin-host"):
        if arg_value(args, flag) != "0.0.0.0":
            problems.append(f"{flag} {arg_value(args, flag)}: the Services cannot reach it")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    state = arg_value(args, "--state-dir") or ""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = [
        m
        for m in c.get("volumeMounts", [])
        if m["name"] in claims and (state + "/").startswith(m["mountPath"].rstrip("/") + "/")
    ]
    if not mounts:
        problems.append(f"--state-dir {state!r} is not on a PersistentVolumeClaim")
    elif claims[mounts[0]["name"]] not in {
        d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"
    }:
        problems.append(f"claim {claims[mounts[0]['name']]} is not among the manifests")
    image = c["image"].split(":")[0]
    if image not in {i["name"] for i in kustomization().get("images", [])}:
        problems.append(f"image {c['image']} is not set by kustomization.yaml's images")
    return problems


def pod_problems(docs: list[Doc]) -> list[str]:
    """One replica, Recreate, room to drain, resources, and the restricted pod security."""
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(docs)
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    problems = []
    if (
        dep["spec"].get("replicas") != 1
        or dep["spec"].get("strategy", {}).get("type") != "Recreate"
    ):
        problems.append("one replica with the Recreate strategy (one SQLite writer)")
    drain = UpSettings.__dataclass_fields__["drain_timeout_s"].default
    if pod.get("terminationGracePeriodSeconds", 30) < drain + 5:
        problems.append(f"terminationGracePeriodSeconds under the drain timeout {drain} s + 5")
    for kind in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})):
            problems.append(f"resources.{kind} needs cpu and memory")
    if not (
        csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
        and isinstance(csc.get("runAsUser", psc.get("runAsUser")), int)
        and csc.get("runAsUser", psc.get("runAsUser")) > 0
    ):
        problems.append("runAsNonRoot with a fixed non-zero uid")
    if csc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem")
    if csc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation: false")
    if csc.get("capabilities", {}).get("drop") != ["ALL"] or csc["capabilities"].get("add"):
        problems.append("capabilities: drop ALL, add none")
    if csc.get("seccompProfile", psc.get("seccompProfile")) != {"type": "RuntimeDefault"}:
        problems.append("seccompProfile RuntimeDefault")
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    if not any(m["mountPath"] == "/tmp" and m["name"] in empty for m in c["volumeMounts"]):
        problems.append("/tmp must be a writable emptyDir")
    return problems


def wiring_problems(docs: list[Doc]) -> list[str]:
    """What schemas cannot see: every namespaced object in the one namespace, the Deployment's
    selector matching its pods, each Service selecting the pod and a port it has."""
    namespace = kustomization()["namespace"]
    problems = [
        f"{d['kind']}/{d['metadata']['name']} is in {d['metadata'].get('namespace')}"
        for d in docs
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != namespace
    ]
    if one(docs, "Namespace")["metadata"]["name"] != namespace:
        problems.append("the Namespace is not kustomization.yaml's namespace")
    dep = one(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    if not dep["spec"]["selector"].get("matchLabels", {}).items() <= labels.items():
        problems.append("the Deployment's selector does not match its pod template")
    ports = {p["name"] for p in container(docs).get("ports", [])}
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        if not svc["spec"].get("selector") or not svc["spec"]["selector"].items() <= labels.items():
            problems.append(f"Service {name} does not select raygate's pod")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports:
                problems.append(f"Service {name} targets {p.get('targetPort')!r}, not a named port")
    return problems


def test_the_readme_writes_the_token_key_the_pod_reads() -> None:
    readme = (ROOT / "README.md").read_text()
    written = re.findall(
        r'print\("(\w+)=" \+ secrets\.token_urlsafe\(32\)\)\' > deploy/token\.env', readme
    )
    assert written == [token_key(manifests())]


# ---------------------------------------------------------------- deploy/ as it is


def test_every_manifest_validates_against_kubernetes_schemas() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Secret",
        "ServiceMonitor",
    }
    assert schema_problems(docs) == []


def test_servicemonitor_scrapes_admin_metrics_with_the_token() -> None:
    assert servicemonitor_problems(manifests()) == []


def test_every_manifest_in_deploy_is_listed_in_kustomization() -> None:
    assert listing_problems() == []


def test_probes_are_on_the_admin_port() -> None:
    assert probe_problems(manifests()) == []


def test_role_grants_exactly_what_the_kuberay_provider_needs() -> None:
    assert role_problems(manifests()) == []


def test_container_runs_the_kuberay_provider_with_its_state_on_the_volume() -> None:
    assert args_problems(manifests()) == []


def test_objects_are_wired_to_each_other() -> None:
    assert wiring_problems(manifests()) == []


def test_pod_is_single_non_root_and_read_only() -> None:
    assert pod_problems(manifests()) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not installed")
def test_what_kustomize_renders_validates_too(tmp_path: Path) -> None:
    """The real kustomize (kubectl's), on a copy with a token.env: it renders exactly the
    resources read above (plus the generated Secret), and they validate."""
    copy_dir = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy_dir, ignore=shutil.ignore_patterns("token.env", "systemd"))
    (copy_dir / "token.env").write_text(f"{token_key(manifests())}={'t' * 32}\n")
    out = subprocess.run(
        ["kubectl", "kustomize", str(copy_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert kinds == sorted((d["kind"], d["metadata"]["name"]) for d in manifests())
    assert schema_problems(rendered) == []
    secret = one(rendered, "Secret")
    assert base64.b64decode(secret["data"][token_key(rendered)]) == b"t" * 32
    assert ":" in container(rendered)["image"]  # the images: entry applied


# ---------------------------------------------------------------- each check can fail


def _set(path: str, value: Any) -> Callable[[list[Doc]], None]:
    """Mutation: set `Kind.dotted.path` (list indexes as numbers) in the first doc of Kind."""
    kind, *keys = path.split(".")

    def mutate(docs: list[Doc]) -> None:
        node: Any = next(d for d in docs if d["kind"] == kind)
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = keys[-1]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _arg(flag: str, value: str) -> Callable[[list[Doc]], None]:
    """Mutation: the value after `flag` in the container's args becomes `value`."""

    def mutate(docs: list[Doc]) -> None:
        args = container(docs)["args"]
        args[args.index(flag) + 1] = value

    return mutate


def _mount(path: str, new_path: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        next(m for m in container(docs)["volumeMounts"] if m["mountPath"] == path)["mountPath"] = (
            new_path
        )

    return mutate


DELETE = object()
POD = "Deployment.spec.template.spec"
C0 = POD + ".containers.0"

BROKEN: list[tuple[str, Callable[[list[Doc]], None], Callable[[list[Doc]], list[str]]]] = [
    ("misspelt field", _set(C0 + ".securityContext.readOnlyRootFileSystem", True), schema_problems),
    ("wrong type", _set("Deployment.spec.replicas", "1"), schema_problems),
    (
        "unknown kind",
        lambda d: d.append({"apiVersion": "x.io/v1", "kind": "Thing", "metadata": {"name": "t"}}),
        schema_problems,
    ),
    (
        "servicemonitor without selector",
        _set("ServiceMonitor.spec.selector", DELETE),
        schema_problems,
    ),
    (
        "servicemonitor misspelt",
        _set("ServiceMonitor.spec.endpoints.0.bearerTokenSecrets", {}),
        schema_problems,
    ),
    (
        "servicemonitor bad interval",
        _set("ServiceMonitor.spec.endpoints.0.interval", "30"),
        schema_problems,
    ),
    (
        "scrapes the data port",
        _set(
            "ServiceMonitor.spec.selector.matchLabels", {"app.kubernetes.io/component": "gateway"}
        ),
        servicemonitor_problems,
    ),
    (
        "scrapes without the token",
        _set("ServiceMonitor.spec.endpoints.0.authorization", DELETE),
        servicemonitor_problems,
    ),
    (
        "readiness on healthz",
        _set(C0 + ".readinessProbe.httpGet.path", "/-/healthz"),
        probe_problems,
    ),
    ("liveness on the data port", _set(C0 + ".livenessProbe.httpGet.port", "http"), probe_problems),
    ("liveness by number", _set(C0 + ".livenessProbe.httpGet.port", 8000), probe_problems),
    (
        "verb too many",
        _set("Role.rules.0.verbs", ["create", "get", "list", "watch", "patch", "delete", "update"]),
        role_problems,
    ),
    ("verb missing", _set("Role.rules.1.verbs", ["get", "list"]), role_problems),
    ("secrets", _set("Role.rules.1.resources", ["pods", "services", "secrets"]), role_problems),
    ("wildcard", _set("Role.rules.0.resources", ["*"]), role_problems),
    ("bound elsewhere", _set("RoleBinding.subjects.0.name", "default"), role_problems),
    ("local provider", _arg("--provider", "local"), args_problems),
    ("no provider", lambda d: container(d)["args"].remove("--provider"), args_problems),
    ("fixed namespace", _arg("--namespace", "default"), args_problems),
    ("state on the tmp dir", _arg("--state-dir", "/tmp/state"), args_problems),
    ("admin on loopback", _arg("--admin-host", "127.0.0.1"), args_problems),
    ("other namespace", _set("Role.metadata.namespace", "default"), wiring_problems),
    (
        "selector typo",
        _set("Service.spec.selector", {"app.kubernetes.io/name": "raygat"}),
        wiring_problems,
    ),
    ("unknown target port", _set("Service.spec.ports.0.targetPort", "metrics"), wiring_problems),
    ("no selector", _set("Service.spec.selector", DELETE), wiring_problems),
    ("two replicas", _set("Deployment.spec.replicas", 2), pod_problems),
    ("rolling update", _set("Deployment.spec.strategy.type", "RollingUpdate"), pod_problems),
    ("short grace", _set(POD + ".terminationGracePeriodSeconds", 10), pod_problems),
    ("writable root", _set(C0 + ".securityContext.readOnlyRootFilesystem", False), pod_problems),
    ("escalation", _set(C0 + ".securityContext.allowPrivilegeEscalation", True), pod_problems),
    ("a capability", _set(C0 + ".securityContext.capabilities.add", ["NET_ADMIN"]), pod_problems),
    ("root", _set(POD + ".securityContext.runAsUser", 0), pod_problems),
    ("no limits", _set(C0 + ".resources.limits", DELETE), pod_problems),
    ("no tmp", _mount("/tmp", "/scratch"), pod_problems),
]


@pytest.mark.parametrize(("what", "mutate", "check"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_check_catches_a_broken_manifest(
    what: str, mutate: Callable[[list[Doc]], None], check: Callable[[list[Doc]], list[str]]
) -> None:
    docs = manifests()
    assert check(docs) == [], "the check must pass on deploy/ as it is"
    broken = copy.deepcopy(docs)
    mutate(broken)
    assert check(broken), f"{check.__name__} did not notice: {what}"


def test_listing_check_catches_a_forgotten_and_a_missing_file(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY, tmp_path / "d", ignore=shutil.ignore_patterns("token.env"))
    (tmp_path / "d" / "networkpolicy.yaml").write_text("kind: NetworkPolicy\n")
    assert listing_problems(tmp_path / "d") == [
        "networkpolicy.yaml is not in kustomization.yaml's resources"
    ]
    (tmp_path / "d" / "networkpolicy.yaml").unlink()
    (tmp_path / "d" / "pvc.yaml").unlink()
    assert listing_problems(tmp_path / "d") == ["pvc.yaml is listed but missing"]


# ---------------------------------------------------------------- the KubeRay digits spec


def _pin(package: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(rf'"{re.escape(package)}(\[[^\]]*\])?==([^"]+)"', text)
    assert found, package
    return found.group(2)


def kuberay_example_problems(spec: Doc, v1: Doc, dockerfile: str) -> list[str]:
    """serve_configs/digits/kuberay.yaml is v1.yaml on a RayCluster: same serve and upgrade
    sections, only `cluster.kuberay`, Ray's version everywhere, the ports raygate dials, pod
    templates Kubernetes accepts, and an image built from the pinned Ray and scikit-learn."""
    problems = []
    for key in ("name", "serve", "upgrade"):
        if spec.get(key) != v1.get(key):
            problems.append(f"{key} differs from v1.yaml")
    if set(spec["cluster"]) != {"kuberay"}:
        problems.append(f"cluster has {sorted(spec['cluster'])}, only kuberay may be set")
    ray = spec["cluster"]["kuberay"]
    ray_version = _pin("ray")
    if ray.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {ray.get('rayVersion')!r}, raygate pins Ray {ray_version}")
    groups = [("headGroupSpec", ray["headGroupSpec"])] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(ray.get("workerGroupSpecs", []))
    ]
    images = set()
    for where, group in groups:
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": group["template"],
        }
        try:
            kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}.template: {'.'.join(map(str, e.path))}: {e.message}")
        ray_container = group["template"]["spec"]["containers"][0]
        images.add(ray_container["image"])
        if not {"cpu", "memory"} <= set(ray_container.get("resources", {}).get("limits", {})):
            problems.append(f"{where}: the Ray container needs cpu and memory limits")
    head = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name"): p.get("containerPort") for p in head.get("ports", [])}
    if ports.get("dashboard") != 8265 or ports.get("serve") != 8000:
        problems.append(f"head ports {ports}: dashboard 8265 and serve 8000 must be listed")
    for i, g in enumerate(ray.get("workerGroupSpecs", [])):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", g.get("groupName", "")):
            problems.append(f"workerGroupSpecs[{i}].groupName {g.get('groupName')!r}")
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
            problems.append(f"workerGroupSpecs[{i}]: min <= replicas <= max")
    if len(images) != 1:
        problems.append(f"head and workers run different images {sorted(images)}")
    if not re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py311\s*$", dockerfile, re.M):
        problems.append(f"the image is not built FROM rayproject/ray:{ray_version}-py311")
    if f"scikit-learn=={_pin('scikit-learn')}" not in dockerfile:
        problems.append(f"the image does not install scikit-learn=={_pin('scikit-learn')}")
    if not re.search(r"^ENV PYTHONPATH=/home/ray/apps\s*$", dockerfile, re.M) or not re.search(
        r"^COPY .*apps/ /home/ray/apps/\s*$", dockerfile, re.M
    ):
        problems.append("the image does not put the app (serve_configs/apps) on PYTHONPATH")
    return problems


def _kuberay_inputs() -> tuple[Doc, Doc, str]:
    return (
        yaml.safe_load((DIGITS / "kuberay.yaml").read_text()),
        yaml.safe_load((DIGITS / "v1.yaml").read_text()),
        (DIGITS / "Dockerfile").read_text(),
    )


def test_kuberay_digits_spec_is_v1_on_a_raycluster() -> None:
    assert kuberay_example_problems(*_kuberay_inputs()) == []


HEAD_C0 = ("headGroupSpec", "template", "spec", "containers", 0)
BROKEN_EXAMPLE: list[tuple[str, Callable[[Doc, Doc, str], tuple[Doc, Doc, str]]]] = [
    ("a local field too", lambda s, v, d: (s | {"cluster": s["cluster"] | {"num_cpus": 2}}, v, d)),
    ("other serve section", lambda s, v, d: (s | {"serve": {"applications": []}}, v, d)),
    ("no serve port", lambda s, v, d: (_drop_port(s, "serve"), v, d)),
    ("misspelt pod field", lambda s, v, d: (_misspell(s), v, d)),
    ("other Ray", lambda s, v, d: (s, v, d.replace("ray:2.60.0-py311", "ray:2.59.0-py311"))),
    ("unpinned sklearn", lambda s, v, d: (s, v, d.replace("scikit-learn==", "scikit-learn>="))),
]


def _drop_port(spec: Doc, name: str) -> Doc:
    spec = copy.deepcopy(spec)
    head = spec["cluster"]["kuberay"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"] = [p for p in head["ports"] if p["name"] != name]
    return spec


def _misspell(spec: Doc) -> Doc:
    spec = copy.deepcopy(spec)
    head = spec["cluster"]["kuberay"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resource"] = head.pop("resources")
    return spec


@pytest.mark.parametrize(("what", "mutate"), BROKEN_EXAMPLE, ids=[b[0] for b in BROKEN_EXAMPLE])
def test_kuberay_example_check_catches_a_broken_copy(
    what: str, mutate: Callable[[Doc, Doc, str], tuple[Doc, Doc, str]]
) -> None:
    assert kuberay_example_problems(*mutate(*_kuberay_inputs())), what
