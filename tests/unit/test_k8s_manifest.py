"""deploy/k8s/ parses and agrees with itself and with the gateway: ports, probe paths,
settings, the Redis and vLLM Services the gateway is pointed at, and autoscalers that target
the vLLM Deployment on metrics a real gateway exports. No Kubernetes here: read statically."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import scrape
from gateway.app import create_app
from gateway.config import load_config
from gateway.settings import Settings, parse_settings
from tests.unit.conftest import GatewayFactory
from tests.unit.test_deploy_static import argv, gateway_env_names, service

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"

#: The prometheus scaler's metadata fields in KEDA's documentation (keda.sh, scalers/prometheus).
KEDA_PROMETHEUS_FIELDS = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "unsafeSsl", "queryParameters", "timeout",
}  # fmt: skip


def documents(name: str) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
        if doc:
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def only(name: str, kind: str) -> dict[str, Any]:
    (doc,) = documents(name)[kind]
    return doc


def pod(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = only(name, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(name: str = "gateway.yaml") -> dict[str, Any]:
    (first,) = pod(name)["containers"]
    return first  # type: ignore[no-any-return]


def env() -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container()["env"]}


def services() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for path in K8S.glob("*.yaml")
        for doc in documents(path.name).get("Service", [])
    }


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


# -- the gateway -------------------------------------------------------------------------------


def test_files_hold_the_expected_objects() -> None:
    assert {p.name: {k: len(v) for k, v in documents(p.name).items()} for p in K8S.glob("*")} == {
        "gateway.yaml": {"ConfigMap": 1, "Deployment": 1, "Service": 1},
        "redis.yaml": {"Deployment": 1, "Service": 1},
        "vllm.yaml": {"Deployment": 1, "Service": 1},
        "autoscaling-keda.yaml": {"ScaledObject": 1},
        "autoscaling-hpa.yaml": {"ConfigMap": 1, "HorizontalPodAutoscaler": 1},
    }


@pytest.mark.parametrize("name", ["gateway.yaml", "redis.yaml", "vllm.yaml"])
def test_each_service_selects_its_deployment_on_a_named_port(name: str) -> None:
    deployment, svc = only(name, "Deployment"), only(name, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"] for p in container(name)["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_two_gateways_on_the_default_port() -> None:
    assert only("gateway.yaml", "Deployment")["spec"]["replicas"] == 2
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": Settings().port}  # the image listens on the default port


def test_probes_use_ready_and_health() -> None:
    gateway = container()
    readiness, liveness = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/ready", "http")
    assert (liveness["path"], liveness["port"]) == ("/health", "http")
    routes = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    assert {"/ready", "/health", "/metrics"} <= routes


def test_environment_is_what_the_gateway_reads() -> None:
    variables = env()
    known = gateway_env_names()
    assert set(variables) <= known, set(variables) - known
    read_now = {k: v for k, v in variables.items() if k in known and v}
    settings = parse_settings([], read_now)
    assert str(settings.window) == flag(container("vllm.yaml")["args"], "--max-num-seqs")
    grace = float(variables.get("GATEWAY_SHUTDOWN_GRACE", Settings().shutdown_grace_s))
    assert pod("gateway.yaml")["terminationGracePeriodSeconds"] > grace


def test_redis_url_names_the_redis_service() -> None:
    url = httpx.URL(env()["GATEWAY_REDIS_URL"])
    assert url.scheme == "redis"
    redis = services()[url.host]
    assert url.port in {p["port"] for p in redis["spec"]["ports"]}
    assert flag(container("redis.yaml")["args"], "--save") == ""  # soft state: no snapshots


def test_upstreams_file_is_the_mounted_configmap_naming_the_headless_vllm_service() -> None:
    path = PurePosixPath(env()["GATEWAY_UPSTREAMS_FILE"])
    (mount,) = (
        m for m in container()["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent
    )
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    (volume,) = (v for v in pod("gateway.yaml")["volumes"] if v["name"] == mount["name"])
    configmap = only("gateway.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (entry,) = tomllib.loads(configmap["data"][path.name])["upstream"]
    host, _namespace, *rest = entry["dns"].split(".")
    assert rest == ["svc", "cluster", "local"]
    vllm = services()[host]
    assert vllm["spec"]["clusterIP"] == "None"  # headless: one address per ready pod
    assert vllm["spec"].get("publishNotReadyAddresses", False) is False  # loading pods stay out
    assert entry["port"] == container("vllm.yaml")["ports"][0]["containerPort"]
    assert entry["port"] in {p["port"] for p in vllm["spec"]["ports"]}
    assert "UPSTREAMS" not in env()


def test_runs_as_the_images_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = pod("gateway.yaml")["securityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}\b", dockerfile, re.MULTILINE)


# -- vLLM --------------------------------------------------------------------------------------


def test_vllm_runs_with_composes_flags() -> None:
    """The same server and flags as compose.yaml's GPU service (which test_deploy_static.py
    holds to launch/vllm.sh)."""
    vllm = container("vllm.yaml")
    compose = service("vllm")
    assert vllm["command"] == argv(compose["entrypoint"])
    assert vllm["args"] == argv(compose["command"])
    assert vllm["image"] == re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", compose["image"])


def test_vllm_waits_for_its_model_and_drains_before_it_stops() -> None:
    vllm = container("vllm.yaml")
    startup = vllm["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # minutes to load
    python, flag_c, script = vllm["lifecycle"]["preStop"]["exec"]["command"]
    assert (python, flag_c) == ("python3", "-c")
    compile(script, "preStop", "exec")  # a syntax error would skip the drain silently
    assert f'("{scrape.RUNNING}", "{scrape.WAITING}")' in script  # the names the gateway reads
    gateway_grace = pod("gateway.yaml")["terminationGracePeriodSeconds"]
    assert pod("vllm.yaml")["terminationGracePeriodSeconds"] > gateway_grace


# -- autoscaling -------------------------------------------------------------------------------


def keda_triggers() -> list[dict[str, Any]]:
    triggers: list[dict[str, Any]] = only("autoscaling-keda.yaml", "ScaledObject")["spec"][
        "triggers"
    ]
    return triggers


def hpa() -> dict[str, Any]:
    return only("autoscaling-hpa.yaml", "HorizontalPodAutoscaler")


def adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(only("autoscaling-hpa.yaml", "ConfigMap")["data"]["config.yaml"])
    rules: list[dict[str, Any]] = config["externalRules"]
    return rules


def queries() -> list[str]:
    return [t["metadata"]["query"] for t in keda_triggers()] + [
        r["seriesQuery"] for r in adapter_rules()
    ]


def test_autoscalers_target_the_vllm_deployment() -> None:
    vllm = only("vllm.yaml", "Deployment")["metadata"]["name"]
    scaled = only("autoscaling-keda.yaml", "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == vllm
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    target = hpa()["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", vllm)
    # Never to zero: a first request would wait for a model load.
    assert scaled["minReplicaCount"] >= 1
    assert hpa()["spec"]["minReplicas"] >= 1


def test_keda_triggers_use_the_documented_prometheus_fields() -> None:
    for trigger in keda_triggers():
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] in ("Value", "AverageValue")
        metadata = trigger["metadata"]
        assert set(metadata) <= KEDA_PROMETHEUS_FIELDS, set(metadata) - KEDA_PROMETHEUS_FIELDS
        assert {"serverAddress", "query", "threshold"} <= set(metadata)
        assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata is strings"
        float(metadata["threshold"])
        assert metadata["ignoreNullValues"] == "false"  # a lost target must not read as idle


def test_scale_in_is_slower_than_scale_out_and_both_match() -> None:
    keda = only("autoscaling-keda.yaml", "ScaledObject")["spec"]["advanced"]
    behaviour = keda["horizontalPodAutoscalerConfig"]["behavior"]
    assert behaviour == hpa()["spec"]["behavior"]
    up, down = behaviour["scaleUp"], behaviour["scaleDown"]
    assert down["stabilizationWindowSeconds"] > max(p["periodSeconds"] for p in up["policies"])
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]


def test_hpa_asks_what_keda_asks() -> None:
    """The two autoscalers are alternatives: the same metrics, selections and targets."""

    def selection(metric: dict[str, Any]) -> tuple[str, frozenset[str]]:
        selector = metric.get("selector", {})
        values = set(selector.get("matchLabels", {}).values())
        for expression in selector.get("matchExpressions", []):
            values |= set(expression["values"])
        return metric["name"], frozenset(values)

    from_hpa = {
        selection(m["external"]["metric"]): quantity(str(m["external"]["target"]["value"]))
        for m in hpa()["spec"]["metrics"]
    }
    from_keda = {}
    for trigger in keda_triggers():
        query = trigger["metadata"]["query"]
        name = re.search(r"gateway_\w+", query)
        assert name, query
        classes = re.search(r'priority_class=~?"([^"]+)"', query)
        values = frozenset(classes.group(1).split("|")) if classes else frozenset()
        from_keda[name.group(0), values] = float(trigger["metadata"]["threshold"])
    assert from_hpa == from_keda
    served = {r["name"]["as"] for r in adapter_rules()}
    assert {name for name, _ in from_hpa} <= served


def test_queries_select_classes_of_the_task_table() -> None:
    classes = set(load_config().classes.names())
    for query in queries():
        for match in re.findall(r'priority_class=~?"([^"]+)"', query):
            assert set(match.split("|")) <= classes, query


async def test_queries_name_metrics_a_real_gateway_exports(start_gateway: GatewayFactory) -> None:
    async with start_gateway() as url, httpx.AsyncClient(base_url=url) as client:
        page = (await client.get("/metrics")).text
    exported = {s.name for f in text_string_to_metric_families(page) for s in f.samples}
    for query in queries():
        names = set(re.findall(r"\bgateway_\w+", query))
        assert names, query
        assert names <= exported, (query, names - exported)
