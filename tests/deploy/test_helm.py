"""The Helm chart (deploy/helm/fraudscore), checked without a cluster.

Rendering and linting go through Helm's own engine (Helm v4's Go SDK, bundled as a shared
library in the PyPI package helm-python-sdk: no helm binary, no network). Every rendered
manifest is validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate,
in strict mode (unknown fields are errors), for KUBE_VERSION.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from core.rules.file import load_ruleset
from service.runtime.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "fraudscore"
PRODUCTION_VALUES = ROOT / "deploy" / "helm" / "examples" / "values-production.yaml"
KUBE_VERSION = "1.33.0"  # a version kubernetes-validate ships schemas for; the chart needs ≥ 1.27
RELEASE, NAMESPACE = "fs", "payments"

SETTINGS = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
DEFAULT_GRACE_S = Settings().shutdown_grace_s

# Kinds whose schema is not part of Kubernetes (CustomResourceDefinitions); checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Everything optional switched on, TLS without auth: the widest plain-TLS render.
TLS_ONLY = {
    "tls": {"enabled": True, "existingSecret": "fs-tls"},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
}
AUTH_ONLY = {"auth": {"enabled": True, "existingSecret": "fs-tokens"}, "networkPolicy": {"enabled": True}}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return values


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render like `helm template`, parse every YAML document, drop the empty ones."""
    files = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = pod_spec(docs)["containers"]
    c: dict[str, Any] = only
    return c


def config_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The FRAUDSCORE_* environment the container gets: its ConfigMap plus its own env."""
    c = container(docs)
    (source,) = c["envFrom"]
    config_maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == source["configMapRef"]["name"]]
    assert len(config_maps) == 1, "the envFrom ConfigMap is rendered by the chart"
    env: dict[str, str] = dict(config_maps[0]["data"])
    for var in c.get("env", []):
        env[var["name"]] = var.get("value", "<from secret>")
    return env


def render_error(chart: helm.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmRenderError) as failed:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    return str(failed.value)


VARIANTS = {
    "default": lambda: None,
    "production": production_values,
    "tls-only": lambda: TLS_ONLY,
    "auth-only": lambda: AUTH_ONLY,
    # Several pods on a shared Redis over TLS with a private CA.
    "shared-state": lambda: {"replicaCount": 3, "state": {"redis": {
        "enabled": True, "existingSecret": "fs-state-url", "tls": {"caSecret": "fs-redis-ca"}}}},
}


# ---- Helm's lint and the Kubernetes schemas ------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "production"])
def test_chart_lints_clean(variant: str) -> None:
    report = helm.lint(CHART_DIR, VARIANTS[variant](), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert problems == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_matches_the_kubernetes_schema(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant]())
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds(docs)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:  # its str() holds the whole schema
            where = "/".join(str(p) for p in error.caught.absolute_path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {error.caught.message}")


def test_the_schema_check_catches_a_bad_manifest(chart: helm.Chart) -> None:
    deployment = one(render(chart), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_service_monitor_scrapes_the_metrics_port_of_the_service(chart: helm.Chart) -> None:
    docs = render(chart, production_values())
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# ---- security ---------------------------------------------------------------------------------


def dockerfile_uid() -> int:
    (user,) = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return int(user)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_run_locked_down(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant]())
    uid = dockerfile_uid()
    pod, c = pod_spec(docs), container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"requests", "limits"} <= c["resources"].keys()


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dir_is_a_writable_volume(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant]())
    state_dir = config_env(docs)["FRAUDSCORE_STATE_DIR"]
    assert state_dir == "/var/lib/fraudscore"  # the Dockerfile's writable directory
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    assert not mounts[state_dir].get("readOnly", False)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert "emptyDir" in volumes[mounts[state_dir]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def dockerfile_env(name: str) -> str:
    """A variable the runtime image's ENV sets (ENV lines and their continuation lines)."""
    (value,) = re.findall(rf"^(?:ENV\s+|\s+){name}=(\S+?)\s*\\?$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return str(value)


@pytest.mark.parametrize("mount_path", [None, "/data/fraudscore", "/data/fraudscore/"])
def test_the_numba_cache_is_on_the_state_volume(chart: helm.Chart, mount_path: str | None) -> None:
    """The image copies its build-time Numba cache into NUMBA_CACHE_DIR at start: it must be writable,
    so it follows state.mountPath (on the read-only root every cached kernel would fail to load)."""
    docs = render(chart, {"state": {"mountPath": mount_path}} if mount_path else None)
    env = config_env(docs)
    cache_dir = env["NUMBA_CACHE_DIR"]
    if mount_path is None:
        assert cache_dir == dockerfile_env("NUMBA_CACHE_DIR")  # the image's own default
    state_mount = (mount_path or "/var/lib/fraudscore").rstrip("/")
    assert cache_dir == f"{state_mount}/numba-cache"
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["mountPath"].rstrip("/") == state_mount]
    assert mount["name"] == "state" and not mount.get("readOnly", False)
    assert env["FRAUDSCORE_STATE_DIR"].rstrip("/") == state_mount


REDIS = {"enabled": True, "existingSecret": "fs-state-url", "secretKey": "url"}


def test_state_on_a_claim_needs_a_single_replica(chart: helm.Chart) -> None:
    single = {"state": {"existingClaim": "fs-state"}, "replicaCount": 1, "autoscaling": {"enabled": False}}
    volumes = {v["name"]: v for v in pod_spec(render(chart, single))["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "fs-state"}
    assert "replicaCount 1" in render_error(chart, {"state": {"existingClaim": "fs-state", "redis": REDIS},
                                                    "replicaCount": 2})


@pytest.mark.parametrize("values", [{"replicaCount": 2}, {"autoscaling": {"enabled": True}}])
def test_more_than_one_pod_needs_one_shared_state(chart: helm.Chart, values: dict[str, Any]) -> None:
    """A split history must never happen by default: several pods each with its own state is refused."""
    message = render_error(chart, values)
    assert "split every card's history" in message and "state.redis.enabled" in message
    docs = render(chart, values | {"state": {"redis": REDIS}})
    assert config_env(docs)["FRAUDSCORE_STATE_URL_FILE"] == "/etc/fraudscore/state-url/url"
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "state-url"]
    assert volume["secret"]["secretName"] == "fs-state-url"
    assert {"mountPath": "/etc/fraudscore/state-url", "name": "state-url", "readOnly": True} in (
        container(docs)["volumeMounts"])
    # A URL without a password may come through config instead; never both.
    assert "FRAUDSCORE_STATE_URL" in config_env(render(chart, values | {
        "config": {"FRAUDSCORE_STATE_URL": "redis://redis.payments:6379/0"}}))
    assert "both name the shared store" in render_error(chart, values | {
        "state": {"redis": REDIS}, "config": {"FRAUDSCORE_STATE_URL": "redis://redis.payments:6379/0"}})
    assert "state.redis.existingSecret" in render_error(chart, {"state": {"redis": {"enabled": True}}})
    workers = {"config": {"FRAUDSCORE_WORKERS": "2"}}
    assert "FRAUDSCORE_WORKERS above 1 needs a shared state" in render_error(chart, workers)
    assert config_env(render(chart, workers | {"state": {"redis": REDIS}}))["FRAUDSCORE_WORKERS"] == "2"


def test_a_private_ca_for_a_tls_redis_is_mounted_from_its_secret(chart: helm.Chart) -> None:
    tls = {"state": {"redis": REDIS | {"tls": {"caSecret": "fs-redis-ca", "caKey": "ca.pem"}}}, "replicaCount": 3}
    docs = render(chart, tls)
    assert config_env(docs)["FRAUDSCORE_STATE_CA_FILE"] == "/etc/fraudscore/state-ca/ca.pem"
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "state-ca"]
    assert volume["secret"]["secretName"] == "fs-redis-ca" and volume["secret"]["items"] == [
        {"key": "ca.pem", "path": "ca.pem"}]
    assert {"mountPath": "/etc/fraudscore/state-ca", "name": "state-ca", "readOnly": True} in (
        container(docs)["volumeMounts"])
    assert "FRAUDSCORE_STATE_CA_FILE" not in config_env(render(chart, {"state": {"redis": REDIS}}))
    assert "state.redis.tls.caSecret is set but state.redis.enabled is not" in render_error(
        chart, {"state": {"redis": {"tls": {"caSecret": "fs-redis-ca"}}}})


def test_one_pod_by_default() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["replicaCount"] == 1 and values["autoscaling"]["enabled"] is False
    assert values["state"]["redis"]["enabled"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_is_rendered_only_referenced(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant]())
    assert "Secret" not in kinds(docs)


def test_secrets_come_from_the_named_existing_secrets(chart: helm.Chart) -> None:
    values = production_values()
    docs = render(chart, values)
    (key,) = [e for e in container(docs)["env"] if e["name"] == "FRAUDSCORE_ID_HASH_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": values["idHashKey"]["existingSecret"],
                                               "key": values["idHashKey"]["secretKey"]}
    secrets = {v["secret"]["secretName"] for v in pod_spec(docs)["volumes"] if "secret" in v}
    assert secrets == {values["tls"]["existingSecret"], values["tls"]["clientCA"]["existingSecret"],
                       values["auth"]["existingSecret"], values["state"]["redis"]["existingSecret"]}
    env = config_env(docs)
    mounted = {m["mountPath"] for m in container(docs)["volumeMounts"] if m.get("readOnly")}
    for name in ("FRAUDSCORE_TLS_CERT_FILE", "FRAUDSCORE_TLS_KEY_FILE", "FRAUDSCORE_TLS_CLIENT_CA_FILE",
                 "FRAUDSCORE_AUTH_TOKENS_FILE", "FRAUDSCORE_STATE_URL_FILE"):
        assert str(Path(env[name]).parent) in mounted, f"{name} points into a mounted Secret"
    assert "FRAUDSCORE_ID_HASH_KEY" not in config_env(render(chart)), "no key: the server's dev key, warned"


@pytest.mark.parametrize(("values", "message"), [
    ({"tls": {"enabled": True}}, "tls.existingSecret"),
    ({"auth": {"enabled": True}}, "auth.existingSecret"),
    ({"tls": {"clientCA": {"enabled": True, "existingSecret": "ca"}}}, "needs tls.enabled"),
    ({"tls": {"enabled": True, "existingSecret": "t", "clientCA": {"enabled": True}}}, "clientCA.existingSecret"),
])
def test_incomplete_tls_or_auth_fails_rendering(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    assert message in render_error(chart, values)


# ---- probes -------------------------------------------------------------------------------------


def probes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    c = container(docs)
    return {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


@pytest.mark.parametrize("variant", ["default", "production", "tls-only", "auth-only"])
def test_probes_are_grpc_on_the_plaintext_health_port_always(chart: helm.Chart, variant: str) -> None:
    # Never on the gRPC port: it refuses calls past its limit and drops those past its short queue,
    # so under overload a probe there could fail and the kubelet restart a pod that is only busy.
    docs = render(chart, VARIANTS[variant]() if variant != "default" else None)
    env = config_env(docs)
    health_port = int(env["FRAUDSCORE_HEALTH_PORT"])
    assert health_port > 0 and health_port != int(env["FRAUDSCORE_PORT"])
    for kind, probe in probes(docs).items():
        assert probe["grpc"] == {"port": health_port}, kind
        assert not {"httpGet", "exec", "tcpSocket"} & probe.keys()
    if variant == "default":
        return  # no NetworkPolicy by default
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports["health"] == health_port
    policy = one(docs, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert {"grpc", "metrics", "health"} <= allowed
    (health_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "health"]
    assert "from" not in health_rule, "kubelet probes come from the node: the health port is open"


def test_the_service_exposes_grpc_and_metrics_only(chart: helm.Chart) -> None:
    docs = render(chart, production_values())
    service = one(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    container_ports = {p["name"] for p in container(docs)["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= container_ports
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


# ---- settings ---------------------------------------------------------------------------------------


def env_names_in(text: str) -> set[str]:
    return set(re.findall(r"\bFRAUDSCORE_[A-Z0-9_]*[A-Z0-9]\b", text))


def test_every_env_name_in_the_chart_is_a_setting(chart: helm.Chart) -> None:
    """Names in the templates, values files and every render must be fields of service.runtime.config.Settings."""
    used: set[str] = set()
    for path in [*CHART_DIR.rglob("*"), PRODUCTION_VALUES]:
        if path.is_file() and path.suffix in {".yaml", ".tpl", ".txt"}:
            used |= env_names_in(path.read_text())
    for variant in VARIANTS.values():
        used |= {n for n in config_env(render(chart, variant())) if n.startswith(ENV_PREFIX)}
    assert {"FRAUDSCORE_PORT", "FRAUDSCORE_TLS_CERT_FILE", "FRAUDSCORE_HEALTH_PORT"} <= used
    assert sorted(used - SETTINGS) == []


@pytest.fixture(scope="module")
def set_by_the_chart(chart: helm.Chart) -> set[str]:
    """Every FRAUDSCORE_* name some variant's values make the chart set."""
    return {name for variant in VARIANTS.values() for name in config_env(render(chart, variant()))}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_chart_knows_every_setting(chart: helm.Chart, set_by_the_chart: set[str], name: str) -> None:
    """Each setting is either passed through from `config` or owned (and set) by a chart value."""
    # Several workers need the shared store (checked by its own test above).
    shared = {"state": {"redis": REDIS}} if name == "FRAUDSCORE_WORKERS" else {}
    try:
        env = config_env(render(chart, {"config": {name: "7"}} | shared))
    except helm.HelmRenderError as error:
        assert "the chart sets this one itself" in str(error)
        assert name in set_by_the_chart
    else:
        assert env[name] == "7"


@pytest.mark.parametrize(("value", "expected"), [
    (2000000, "2000000"), (4194304, "4194304"), (1048576, "1048576"), (50, "50"), (0.5, "0.5"),
    (2.5e6, "2500000"), ("4194304", "4194304"), (-1, "-1"),
])
def test_unquoted_numbers_render_as_the_server_parses_them(chart: helm.Chart, value: object, expected: str) -> None:
    """Helm reads every number in values as a float64; toString would write 2e+06, which the server refuses."""
    name = "FRAUDSCORE_IDEMPOTENCY_MAX_ENTRIES"
    assert config_env(render(chart, {"config": {name: value}}))[name] == expected


def test_large_unquoted_capacities_load_as_settings(chart: helm.Chart) -> None:
    values = {"config": {"FRAUDSCORE_CARD_CAPACITY": 4194304, "FRAUDSCORE_IDEMPOTENCY_MAX_ENTRIES": 2000000},
              "shutdownGraceSeconds": 1000000}
    settings = Settings.load(config_env(render(chart, values)))
    assert settings.card_capacity == 4194304 and settings.idempotency_max_entries == 2000000
    assert settings.shutdown_grace_s == 1000000


def test_an_unknown_setting_fails_rendering(chart: helm.Chart) -> None:
    assert "not a fraudscore setting" in render_error(chart, {"config": {"FRAUDSCORE_BUDGT_MS": "5"}})


# ---- shutdown grace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_outlasts_the_drain(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant]())
    secrets = {"FRAUDSCORE_STATE_URL_FILE", "FRAUDSCORE_STATE_CA_FILE"}  # Secrets' mounts, absent here
    env = {k: v for k, v in config_env(docs).items() if k not in secrets}
    drain_s = Settings.load(env | {"FRAUDSCORE_HOST": "0.0.0.0"}).shutdown_grace_s
    pre_stop = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s


def test_the_chart_default_grace_is_the_server_default(chart: helm.Chart) -> None:
    assert float(config_env(render(chart))["FRAUDSCORE_SHUTDOWN_GRACE_S"]) == DEFAULT_GRACE_S


@pytest.mark.parametrize("grace_s", [0, 10.5, 60])
def test_termination_grace_is_computed_from_the_drain(chart: helm.Chart, grace_s: float) -> None:
    docs = render(chart, {"shutdownGraceSeconds": grace_s, "lifecycle": {"preStopSleepSeconds": 0}})
    assert float(config_env(docs)["FRAUDSCORE_SHUTDOWN_GRACE_S"]) == grace_s
    assert "lifecycle" not in container(docs)
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > grace_s


@pytest.mark.parametrize("too_low", [1, 10, 15])
def test_a_termination_grace_not_above_the_drain_fails_rendering(chart: helm.Chart, too_low: int) -> None:
    # Default drain: preStop 5 s + shutdownGraceSeconds 10 s.
    message = render_error(chart, {"terminationGracePeriodSeconds": too_low})
    assert "terminationGracePeriodSeconds" in message and "must be above" in message


def test_a_termination_grace_above_the_drain_renders_as_given(chart: helm.Chart) -> None:
    assert pod_spec(render(chart, {"terminationGracePeriodSeconds": 16}))["terminationGracePeriodSeconds"] == 16


# ---- config, rules, and what rolls the pods ---------------------------------------------------------


def pod_annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
    annotations: dict[str, str] = one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    return annotations


def test_a_config_change_rolls_the_pods_a_rules_change_does_not(chart: helm.Chart) -> None:
    before = pod_annotations(render(chart))
    config_changed = pod_annotations(render(chart, {"config": {"FRAUDSCORE_BUDGET_MS": "40"}}))
    rules_changed = pod_annotations(render(chart, {"rules": {"content": '{"version": "x", "rules": []}'}}))
    assert config_changed["checksum/config"] != before["checksum/config"]
    assert rules_changed == before  # hot-reloaded by the server
    rolled = {"rules": {"content": '{"version": "x", "rules": []}', "rollOnChange": True}}
    assert pod_annotations(render(chart, rolled))["checksum/rules"] != pod_annotations(
        render(chart, {"rules": {"rollOnChange": True}}))["checksum/rules"]


def test_rules_are_mounted_where_the_setting_points_and_can_update(chart: helm.Chart) -> None:
    docs = render(chart)
    rules_file = Path(config_env(docs)["FRAUDSCORE_RULES_FILE"])
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == str(rules_file.parent)]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"]]
    (item,) = volume["configMap"]["items"]
    assert item["path"] == rules_file.name
    (rules,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    packaged = json.loads((ROOT / "service" / "defaults" / "rules.json").read_text())
    assert json.loads(rules["data"][item["key"]]) == packaged


def test_an_existing_rules_config_map_is_used_not_rendered(chart: helm.Chart) -> None:
    docs = render(chart, production_values())
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "rules"]
    assert volume["configMap"]["name"] == "fraudscore-rules"
    assert all(d["metadata"]["name"] != "fraudscore-rules" for d in docs)
    no_rules = render(chart, {"rules": {"enabled": False}})
    assert "FRAUDSCORE_RULES_FILE" not in config_env(no_rules)


BLOCKLIST_RULES = {
    "version": "with-a-list-file",
    "lists": {"blocked_cards": {"kind": "card", "file": "lists/blocked_cards.txt"}},
    "rules": [{"name": "blocked_card", "when": "card in @blocked_cards", "action": "DECLINE",
               "reason_code": "R_BLOCKED_CARD", "priority": 1}],
}
BLOCKLIST = {"blocked-cards": {"path": "lists/blocked_cards.txt", "content": "# chargebacks\ntok_blocked_1\n"}}


def mounted_rules_dir(docs: list[dict[str, Any]], root: Path) -> Path:
    """Lay out the rules volume as the kubelet would (each item's key at its path), under `root`,
    and return where FRAUDSCORE_RULES_FILE points in it."""
    rules_file = Path(config_env(docs)["FRAUDSCORE_RULES_FILE"])
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["mountPath"] == str(rules_file.parent)]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates (the lists are watched)
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    for item in volume["configMap"]["items"]:
        target = root / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config_map["data"][item["key"]])
    return root / rules_file.name


def test_list_files_beside_the_rules_file_are_mounted_where_the_rules_name_them(
        chart: helm.Chart, tmp_path: Path) -> None:
    values = {"rules": {"content": json.dumps(BLOCKLIST_RULES), "extraFiles": BLOCKLIST}}
    docs = render(chart, values)
    rules_path = mounted_rules_dir(docs, tmp_path)
    assert (tmp_path / "lists" / "blocked_cards.txt").read_text() == BLOCKLIST["blocked-cards"]["content"]
    ruleset = load_ruleset(rules_path)  # as the server loads it: the list file resolves and parses
    assert set(ruleset.lists) == {"blocked_cards"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # A list change is part of the rules: it rolls the pods only with rollOnChange.
    changed = {"rules": {"content": json.dumps(BLOCKLIST_RULES),
                         "extraFiles": {"blocked-cards": {"path": "lists/blocked_cards.txt", "content": "tok_2\n"}}}}
    assert pod_annotations(render(chart, changed)) == pod_annotations(docs)
    rolled = [pod_annotations(render(chart, {"rules": v["rules"] | {"rollOnChange": True}}))["checksum/rules"]
              for v in (values, changed)]
    assert rolled[0] != rolled[1]


def test_list_files_from_an_existing_config_map_are_mounted_by_key(chart: helm.Chart) -> None:
    values = {"rules": {"existingConfigMap": "fraud-ops-rules",
                        "extraFiles": {"blocked-cards": {"path": "lists/blocked_cards.txt"}}}}
    (volume,) = [v for v in pod_spec(render(chart, values))["volumes"] if v["name"] == "rules"]
    assert volume["configMap"]["name"] == "fraud-ops-rules"
    assert volume["configMap"]["items"] == [{"key": "rules.json", "path": "rules.json"},
                                            {"key": "blocked-cards", "path": "lists/blocked_cards.txt"}]


@pytest.mark.parametrize(("extra", "message"), [
    ({"k": {"path": "/etc/passwd", "content": "x"}}, "relative to the rules file"),
    ({"k": {"path": "../secret.txt", "content": "x"}}, "relative to the rules file"),
    ({"k": {"path": "rules.json", "content": "x"}}, "not rules.json"),
    ({"k": {"content": "x"}}, "relative to the rules file"),
    ({"lists/a.txt": {"path": "lists/a.txt", "content": "x"}}, "ConfigMap key"),
    ({"a": {"path": "lists/a.txt", "content": "x"}, "b": {"path": "lists/a.txt", "content": "y"}}, "two keys"),
    ({"k": {"path": "lists/a.txt"}}, "content is empty"),
    ({"..": {"path": "lists/a.txt", "content": "x"}}, "may not be . or .."),
    ({"k": {"path": "./rules.json", "content": "x"}}, "relative to the rules file"),
    ({"k": {"path": "lists/./a.txt", "content": "x"}}, "relative to the rules file"),
])
def test_bad_rules_extra_files_fail_rendering(chart: helm.Chart, extra: dict[str, Any], message: str) -> None:
    assert message in render_error(chart, {"rules": {"extraFiles": extra}})


def test_keys_and_paths_that_look_like_numbers_stay_strings(chart: helm.Chart) -> None:
    docs = render(chart, {"rules": {"extraFiles": {"1e3": {"path": "true", "content": "x"}}}})
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "rules"]
    assert {"key": "1e3", "path": "true"} in volume["configMap"]["items"]
    (rules,) = [d for d in docs if d["kind"] == "ConfigMap" and "1e3" in d.get("data", {})]
    assert rules["data"]["1e3"] == "x"


def test_rules_extra_files_content_with_an_existing_config_map_fails_rendering(chart: helm.Chart) -> None:
    values = {"rules": {"existingConfigMap": "ops", "extraFiles": {"k": {"path": "lists/a.txt", "content": "x"}}}}
    assert "leave content empty" in render_error(chart, values)


# ---- scaling and placement ----------------------------------------------------------------------------


def test_optional_resources_follow_their_switches(chart: helm.Chart) -> None:
    default = render(chart)
    assert "PodDisruptionBudget" in kinds(default)
    assert not {"ServiceMonitor", "NetworkPolicy", "HorizontalPodAutoscaler"} & kinds(default)
    assert one(default, "Deployment")["spec"]["replicas"] == 1  # one pod, unless state is shared
    scaled = render(chart, {"autoscaling": {"enabled": True}, "state": {"redis": REDIS}})
    assert "replicas" not in one(scaled, "Deployment")["spec"], "the HPA owns the replica count"
    off = render(chart, {"autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
                         "serviceAccount": {"create": False}, "replicaCount": 3, "state": {"redis": REDIS}})
    assert not {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceAccount"} & kinds(off)
    assert one(off, "Deployment")["spec"]["replicas"] == 3
    production = render(chart, production_values())
    assert {"ServiceMonitor", "NetworkPolicy", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds(production)
    hpa = one(production, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(production, "Deployment")["metadata"]["name"]


@pytest.mark.parametrize("variant", ["default", "production"])
def test_pods_spread_over_zones_and_nodes(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant]())
    constraints = pod_spec(docs)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for c in constraints:
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()


# ---- values.yaml ---------------------------------------------------------------------------------------


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a comment on its line or on the line above."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        key = re.match(r"^\s*([A-Za-z][\w.-]*):", line)
        if key and "#" not in line and not (i > 0 and lines[i - 1].strip().startswith("#")):
            undocumented.append(f"line {i + 1}: {key.group(1)}")
    assert undocumented == []
