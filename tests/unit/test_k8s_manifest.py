"""deploy/k8s/gateway.yaml parses and agrees with the gateway: ports, probe paths, settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.app import create_app
from gateway.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy/k8s/gateway.yaml"


def documents() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")))
    return {doc["kind"]: doc for doc in docs if doc}


def container() -> dict[str, Any]:
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    return gateway  # type: ignore[no-any-return]


def env() -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container()["env"]}


def test_a_deployment_of_two_and_a_service_that_selects_it() -> None:
    docs = documents()
    assert set(docs) == {"Deployment", "Service"}
    deployment, service = docs["Deployment"], docs["Service"]
    assert deployment["spec"]["replicas"] == 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": Settings().port}  # the image listens on the default port
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_probes_use_ready_and_health() -> None:
    gateway = container()
    readiness, liveness = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/ready", "http")
    assert (liveness["path"], liveness["port"]) == ("/health", "http")
    routes = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    assert {"/ready", "/health", "/metrics"} <= routes


def test_environment_is_what_the_gateway_reads(capsys: pytest.CaptureFixture[str]) -> None:
    variables = env()
    settings = parse_settings([], {k: v for k, v in variables.items() if v})
    assert len(settings.upstreams) == 2
    assert all(url.startswith("http://") for url in settings.upstreams)
    assert settings.window == int(variables["GATEWAY_WINDOW"])
    with pytest.raises(SystemExit):
        parse_settings(["--help"], {})
    known = set(re.findall(r"env\s+(\w+);", capsys.readouterr().out)) | {"GATEWAY_API_KEYS"}
    assert set(variables) <= known, set(variables) - known
    grace = float(variables.get("GATEWAY_SHUTDOWN_GRACE", Settings().shutdown_grace_s))
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace


def test_runs_as_the_images_user() -> None:
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = pod["securityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}\b", dockerfile, re.MULTILINE)
