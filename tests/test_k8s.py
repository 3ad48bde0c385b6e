"""The Kubernetes manifests and the Dockerfile: rendered, schema-validated, and read.

`kubernetes-validate` checks shapes (strictly: unknown fields fail) but not enum values or
cross-references, so the checks that decide whether the proxy actually works in a pod are
made here on the rendered YAML: the sidecar is a *native* sidecar (`restartPolicy: Always`,
exactly), probes hit the admin port, the Service reaches the proxy and not the app, the
config the ConfigMap carries is one the proxy itself accepts.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO_ROOT

from proxy.cli import build_parser
from proxy.config import ENV_PREFIX, load_settings
from proxy.routes import RouteTable

K8S = REPO_ROOT / "k8s"
KUSTOMIZATIONS = (
    "base",
    "overlays/dev",
    "overlays/sidecar",
    "overlays/legacy-sidecar",
    "overlays/gateway",
)
# Only the dev overlay deploys a Redis; the others expect the operator's Secret.
DEV = ("overlays/dev",)
# Native sidecars are beta and on by default from 1.29: the oldest release we support.
K8S_VERSIONS = ("1.29.0", "1.33.0")
PROXY = "idempotency-proxy"
CONFIG_PATH = "/etc/idempotency-proxy/config.yaml"
REDIS_URL_ENV = ENV_PREFIX + "REDIS_URL"
PASSWORD_FILE_ENV = ENV_PREFIX + "STORE__PASSWORD_FILE"
PROXY_ROLE = ("idempotency-proxy.dev/role", "proxy")
TOOL_TIMEOUT = 120

Doc = dict[str, Any]


def _tool(name: str) -> str:
    """The project's copy (test extras, next to this Python) first, then PATH; never skip."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found next to {sys.executable} or on PATH: "
            "install the test extras (pip install -e '.[test]')",
            pytrace=False,
        )
    return found


def _run(*cmd: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    # The script looks in .venv/bin, then PATH: put this interpreter's bin dir on PATH
    # so it finds the same tools as `_tool` when the tests run from another environment.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _render(path: Path) -> str:
    result = _run(_tool("kubectl"), "kustomize", str(path))
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def validation(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """scripts/validate-k8s.sh, run once: it renders every kustomization into a folder
    (before validating, so the files are there even when validation fails), validates
    them strictly against each Kubernetes version and lints the Dockerfile."""
    out = tmp_path_factory.mktemp("k8s")
    for tool in ("kubectl", "kubernetes-validate", "hadolint"):
        _tool(tool)  # fail early, naming the missing tool
    result = _run("bash", str(REPO_ROOT / "scripts" / "validate-k8s.sh"), str(out))
    return result, out


@pytest.fixture(scope="module")
def rendered(validation: tuple[subprocess.CompletedProcess[str], Path]) -> dict[str, Path]:
    """Every kustomization's rendered YAML, by kustomization."""
    result, out = validation
    files = {name: out / (name.replace("/", "-") + ".yaml") for name in KUSTOMIZATIONS}
    missing = [name for name, path in files.items() if not path.is_file()]
    assert not missing, f"not rendered: {missing}\n{result.stdout}{result.stderr}"
    return files


def _docs(rendered: dict[str, Path], name: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(rendered[name].read_text()) if d]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    """The object of that kind whose name is `name` (generated ones carry a hash suffix)."""
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (d["metadata"]["name"] == name or d["metadata"]["name"].startswith(name + "-"))
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata'] for d in found]}"
    return found[0]


def _pod(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def _container(containers: list[Doc], name: str) -> Doc:
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"container {name} not found in {[c['name'] for c in containers]}"
    return found[0]


def _ports(container: Doc) -> set[int]:
    return {int(p["containerPort"]) for p in container.get("ports", [])}


def _check_proxy_container(
    container: Doc, docs: list[Doc], pod: Doc, upstream: str, *, dev: bool
) -> None:
    """What every proxy container needs, sidecar or gateway."""
    assert container["image"].startswith("idempotency-proxy:")
    assert container["args"] == ["run", "--upstream", upstream, "--config", CONFIG_PATH]
    # The args are valid for the proxy's own CLI, with the interface of CONFIG.md.
    parsed = build_parser().parse_args(container["args"])
    assert (parsed.command, parsed.upstream, parsed.config) == ("run", upstream, CONFIG_PATH)
    assert _ports(container) == {8080, 9090}

    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    expected_paths = {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/livez",
    }
    for kind, probe in probes.items():
        assert probe["httpGet"]["path"] == expected_paths[kind], kind
        assert probe["httpGet"]["port"] == 9090, f"{kind} must probe the admin port"

    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"

    resources = container["resources"]
    for side in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[side]), side

    # --config points at a file the mounted ConfigMap provides.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # a writable /tmp for a read-only root filesystem
    volume_name = mounts[os.path.dirname(CONFIG_PATH)]
    volume = next(v for v in pod["volumes"] if v["name"] == volume_name)
    configmap = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    )
    assert os.path.basename(CONFIG_PATH) in configmap["data"]
    # The store URL and the password come from one Secret: the URL as a variable, the
    # password as a mounted file (never in the environment).
    env = {e["name"]: e for e in container["env"]}
    ref = env[REDIS_URL_ENV]["valueFrom"]["secretKeyRef"]
    password_file = env[PASSWORD_FILE_ENV]["value"]
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secret_volume = next(
        v for v in pod["volumes"] if v["name"] == mounted[os.path.dirname(password_file)]
    )
    assert secret_volume["secret"]["secretName"] == ref["name"]
    assert secret_volume["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert not any("PASSWORD" in name and "FILE" not in name for name in env)
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
    if not dev:
        # Production: the operator's Secret points at their Redis; none is deployed.
        assert secrets == [], "a production overlay must not ship a Secret"
        assert not [d for d in docs if d["kind"] == "StatefulSet"], "no dev Redis in production"
        return
    [secret] = secrets
    url = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert url == "redis://idempotency-redis:6379/0"
    assert base64.b64decode(secret["data"]["password"])
    redis_service = _one(docs, "Service", "idempotency-redis")
    assert redis_service["spec"]["clusterIP"] == "None"
    assert any(p["port"] == 6379 for p in redis_service["spec"]["ports"])


def _check_config(text: str, tmp_path: Path) -> None:
    """The ConfigMap's file is one the proxy loads, with the routes the brief asks for."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    settings = load_settings(str(path), {"upstream": "http://127.0.0.1:9000"}, environ={})
    RouteTable(settings)
    assert (settings.listen.port, settings.admin.port) == (8080, 9090)
    assert settings.tenant.header == "X-Tenant-Id"
    assert settings.store.url == "memory://"  # the URL comes from the Secret, never the file
    routes = {r.name: r for r in settings.routes}
    assert routes["pay"].path == "/v1/orders/pay"
    assert (routes["pay"].key.source, routes["pay"].key.target) == ("json", "order_id")
    assert routes["charges"].path == "/v1/charges"
    assert (routes["charges"].key.source, routes["charges"].key.target) == (
        "header",
        "Idempotency-Key",
    )


# --------------------------------------------------------------------------- validation


def test_every_kustomization_is_valid(
    validation: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """`kubernetes-validate --strict` for each version, through the script operators run."""
    result, out = validation
    assert result.returncode == 0, result.stdout + result.stderr
    for version in K8S_VERSIONS:
        assert f"valid     Kubernetes {version} (strict): {len(KUSTOMIZATIONS)}" in result.stdout
    assert sorted(p.name for p in out.glob("*.yaml")) == sorted(
        k.replace("/", "-") + ".yaml" for k in KUSTOMIZATIONS
    )


# --------------------------------------------------------------------------- sidecar


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/sidecar"])
def test_native_sidecar(rendered: dict[str, Path], name: str, tmp_path: Path) -> None:
    docs = _docs(rendered, name)
    deployment = _one(docs, "Deployment", "payment-api")
    pod = _pod(deployment)
    sidecar = _container(pod["initContainers"], PROXY)
    # Exactly "Always": that is what makes an init container a sidecar; the schema
    # accepts any string here.
    assert sidecar["restartPolicy"] == "Always"
    _check_proxy_container(sidecar, docs, pod, "http://127.0.0.1:9000", dev=name in DEV)
    _check_config(
        _one(docs, "ConfigMap", "idempotency-proxy-config")["data"]["config.yaml"], tmp_path
    )
    assert pod["automountServiceAccountToken"] is False
    assert deployment["spec"]["template"]["metadata"]["labels"][PROXY_ROLE[0]] == PROXY_ROLE[1]

    # The app listens on loopback: only the sidecar in its pod can reach it.
    app = _container(pod["containers"], "payment-api")
    assert app["image"] == "example/payment-api:1.0"
    assert app["args"] == ["--host", "127.0.0.1", "--port", "9000"]
    assert _ports(app) == set()
    assert "readinessProbe" not in app  # the kubelet probes the pod IP, not loopback
    assert app["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert PROXY not in {c["name"] for c in pod["containers"]}
    assert pod["terminationGracePeriodSeconds"] >= 35  # preStop + the proxy's drain

    # Clients reach the proxy, never the app's own port.
    service = _one(docs, "Service", "payment-api")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [8080]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_dev_redis_is_durable_and_never_evicts(rendered: dict[str, Path]) -> None:
    docs = _docs(rendered, "overlays/dev")
    statefulset = _one(docs, "StatefulSet", "idempotency-redis")
    args = " ".join(_pod(statefulset)["containers"][0]["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy noeviction" in args
    assert statefulset["spec"]["serviceName"] == "idempotency-redis"
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    mounts = _pod(statefulset)["containers"][0]["volumeMounts"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in mounts


def test_dev_redis_needs_a_password_and_admits_only_proxy_pods(
    rendered: dict[str, Path],
) -> None:
    docs = _docs(rendered, "overlays/dev")
    redis = _pod(_one(docs, "StatefulSet", "idempotency-redis"))["containers"][0]
    assert redis["args"][1:3] == ["--requirepass", "$(REDIS_PASSWORD)"]
    env = {e["name"]: e for e in redis["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    policy = _one(docs, "NetworkPolicy", "idempotency-redis-from-proxy-only")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "idempotency-redis"
    }
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": dict([PROXY_ROLE])}}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    # Every pod that runs the proxy carries that label; no other pod does.
    labelled = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["spec"]["template"]["metadata"]["labels"].get(PROXY_ROLE[0]) == PROXY_ROLE[1]
    }
    assert labelled == {"payment-api"}


@pytest.mark.parametrize(
    ("name", "app"),
    [("overlays/sidecar", "payment-api"), ("overlays/gateway", "idempotency-gateway")],
)
def test_only_the_proxy_port_is_reachable(rendered: dict[str, Path], name: str, app: str) -> None:
    """The pods that run the proxy admit 8080 from anyone and 9090 from monitoring only."""
    docs = _docs(rendered, name)
    [policy] = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": app}
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_rule, admin_rule = policy["spec"]["ingress"]
    assert open_rule == {"ports": [{"port": 8080, "protocol": "TCP"}]}
    assert admin_rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert admin_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_monitoring_component(tmp_path: Path) -> None:
    """ServiceMonitor + PrometheusRule next to a production overlay; the rule carries
    every alert of docs/operations.md."""
    overlay = os.path.relpath(K8S / "overlays" / "sidecar", tmp_path)
    component = os.path.relpath(K8S / "components" / "monitoring", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [overlay],
                "components": [component],
            }
        )
    )
    text = _render(tmp_path)
    (tmp_path / "rendered.yaml").write_text(text)
    for version in K8S_VERSIONS:
        result = _run(
            _tool("kubernetes-validate"),
            "--strict",
            "--quiet",
            "-k",
            version,
            str(tmp_path / "rendered.yaml"),
        )
        assert result.returncode == 0, result.stdout + result.stderr
    docs = [d for d in yaml.safe_load_all(text) if d]
    monitor = _one(docs, "ServiceMonitor", "idempotency-proxy")
    service = _one(docs, "Service", "idempotency-proxy-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = service["spec"]["ports"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    assert port["targetPort"] == 9090
    labels = _one(docs, "Deployment", "payment-api")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()

    rule = _one(docs, "PrometheusRule", "idempotency-proxy")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    table = (REPO_ROOT / "docs" / "operations.md").read_text().split("## Alerts", 1)[1]
    table = table.split("\n## ", 1)[0]
    metrics = {
        m
        for m in re.findall(r"\b((?:idempotency_proxy|redis|kube_pod)_\w+)", table)
        if m != "redis_exporter"
    }
    assert metrics, table
    missing = sorted(m for m in metrics if m not in exprs)
    assert not missing, f"alerts in operations.md without a rule: {missing}"


def test_legacy_overlay_runs_the_proxy_as_a_plain_container(
    rendered: dict[str, Path],
) -> None:
    docs = _docs(rendered, "overlays/legacy-sidecar")
    pod = _pod(_one(docs, "Deployment", "payment-api"))
    assert PROXY not in {c["name"] for c in pod.get("initContainers", [])}
    assert not any(c.get("restartPolicy") for c in pod.get("initContainers", []))
    proxy = _container(pod["containers"], PROXY)
    # restartPolicy on a regular container is refused by the API server.
    assert "restartPolicy" not in proxy
    _check_proxy_container(proxy, docs, pod, "http://127.0.0.1:9000", dev=False)
    # Both containers get SIGTERM together here: the proxy keeps its port open meanwhile.
    assert proxy["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}


def test_component_adds_the_sidecar_to_any_labelled_deployment(tmp_path: Path) -> None:
    """The component on someone else's app: only the opted-in Deployment changes, and its
    own init containers and volumes survive the merge."""

    def deployment(name: str, labels: dict[str, str]) -> Doc:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "initContainers": [{"name": "migrate", "image": "example/migrate:1"}],
                        "containers": [{"name": "app", "image": "example/app:1"}],
                        "volumes": [{"name": "cache", "emptyDir": {}}],
                    },
                },
            },
        }

    (tmp_path / "apps.yaml").write_text(
        yaml.safe_dump_all(
            [
                deployment("orders", {"idempotency-proxy.dev/sidecar": "enabled"}),
                deployment("reports", {}),
            ]
        )
    )
    component = os.path.relpath(K8S / "components" / "idempotency-sidecar", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["apps.yaml"],
                "components": [component],
            }
        )
    )
    docs = [d for d in yaml.safe_load_all(_render(tmp_path)) if d]
    orders = _pod(_one(docs, "Deployment", "orders"))
    # The merge puts the sidecar first (k8s/overlays/legacy-sidecar relies on that).
    assert [c["name"] for c in orders["initContainers"]] == [PROXY, "migrate"]
    assert _container(orders["initContainers"], PROXY)["restartPolicy"] == "Always"
    assert [c["name"] for c in orders["containers"]] == ["app"]
    assert {"cache", "idempotency-proxy-config"} <= {v["name"] for v in orders["volumes"]}
    reports = _pod(_one(docs, "Deployment", "reports"))
    assert [c["name"] for c in reports["initContainers"]] == ["migrate"]
    assert [v["name"] for v in reports["volumes"]] == ["cache"]
    assert _one(docs, "ConfigMap", "idempotency-proxy-config")


# --------------------------------------------------------------------------- gateway


def test_gateway_overlay(rendered: dict[str, Path], tmp_path: Path) -> None:
    docs = _docs(rendered, "overlays/gateway")
    deployment = _one(docs, "Deployment", "idempotency-gateway")
    pod = _pod(deployment)
    assert not pod.get("initContainers")
    proxy = _container(pod["containers"], PROXY)
    _check_proxy_container(proxy, docs, pod, "http://legacy-payment-api:9000", dev=False)
    assert pod["automountServiceAccountToken"] is False
    assert deployment["spec"]["template"]["metadata"]["labels"][PROXY_ROLE[0]] == PROXY_ROLE[1]
    assert proxy["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    _check_config(
        _one(docs, "ConfigMap", "idempotency-gateway-config")["data"]["config.yaml"], tmp_path
    )

    # The upstream is the legacy API's Service; the gateway's Service reaches the proxy.
    legacy = _one(docs, "Service", "legacy-payment-api")
    assert [p["port"] for p in legacy["spec"]["ports"]] == [9000]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one(docs, "Service", "idempotency-gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [8080]
    assert service["spec"]["selector"].items() <= labels.items()

    hpa = _one(docs, "HorizontalPodAutoscaler", "idempotency-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "idempotency-gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = _one(docs, "PodDisruptionBudget", "idempotency-gateway")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_lints_clean() -> None:
    result = _run(
        _tool("hadolint"),
        "--no-color",
        "--failure-threshold",
        "info",
        str(REPO_ROOT / "Dockerfile"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def _instructions() -> Iterator[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def test_dockerfile_runtime_stage() -> None:
    instructions = list(_instructions())
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    # The Debian release in the tag (docs/operations.md: how to pin the digest).
    assert all(f.split(" ")[0].startswith("python:3.11-slim-bookworm") for f in froms), froms
    runtime = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    values = {word: rest for word, rest in runtime}
    assert values["USER"].split(":")[0] == "10001"
    assert values["ENTRYPOINT"] == '["idempotency-proxy"]'
    assert values["CMD"] == '["run"]'
    assert set(values["EXPOSE"].split()) == {"8080", "9090"}
    # No credential or store address is baked into the image.
    baked = " ".join(rest for word, rest in instructions if word in ("ENV", "ARG", "LABEL"))
    assert not any(w in baked.upper() for w in ("PASSWORD", "SECRET", "TOKEN", "REDIS://"))


def test_dependencies_come_from_the_hashed_lock() -> None:
    """Image and CI install the runtime dependencies from requirements.lock, hash-checked."""
    lock = (REPO_ROOT / "requirements.lock").read_text()
    pins = [line for line in lock.splitlines() if "==" in line and not line.startswith("#")]
    assert pins
    # Every pin is followed by at least one hash.
    blocks = lock.split("==")[1:]
    assert all("--hash=sha256:" in block.split("\n#", 1)[0] for block in blocks)
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert "--require-hashes" in runs and "-r requirements.lock" in runs
    assert "--no-deps /wheels/" in runs
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile
    ignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"!requirements.lock", "!LICENSE"} <= set(ignore)
    # The environment the tests run in has the locked versions; the lock covers pyproject.
    result = _run(sys.executable, str(REPO_ROOT / "scripts" / "check-lock.py"))
    assert result.returncode == 0, result.stderr


def test_license_matches_the_declared_one() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    labels = " ".join(rest for word, rest in _instructions() if word == "LABEL")
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
