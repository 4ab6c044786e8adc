"""compose.yaml, the Dockerfiles and the Prometheus/Grafana wiring agree with each other and
with the gateway, read statically (no Docker engine needed).

What must line up: the files each service builds from or mounts exist; ports and URLs match
the gateway's defaults (gateway 8080, vLLM 8000, UPSTREAMS); both vLLM services pass every
flag launch/vllm.sh passes; the gateway's window equals vLLM's --max-num-seqs; Prometheus
scrapes services that exist on the ports they listen on; Grafana's provisioning points at
files that exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
VLLM_SH = ROOT / "launch/vllm.sh"
COMMON_SH = ROOT / "launch/common.sh"
GATEWAY_PORT = Settings().port
VLLM_PORT = 8000
REDIS_PORT = 6379


# -- helpers -----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services[name]


def interpolate(value: Any) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR}``, with nothing set."""

    def sub(match: re.Match[str]) -> str:
        default = match.group(3)
        return default if default is not None else ""

    return re.sub(r"\$\{(\w+)(:?-)?([^}]*)?\}", sub, str(value)).replace("$$", "$")


def argv(value: Any) -> list[str]:
    """A compose ``command``/``entrypoint`` (list or string) as interpolated argv."""
    if isinstance(value, str):
        return [interpolate(a) for a in shlex.split(value)]
    return [interpolate(a) for a in value]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(v) for k, v in env.items()}


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def bind_mounts(svc: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> host path, for bind mounts (named volumes left out)."""
    mounts = {}
    for volume in svc.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[PurePosixPath(target)] = (ROOT / source).resolve()
    return mounts


def host_path(svc: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the container comes from on the host, through a bind mount."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(svc).items():
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not inside any bind mount of the service")


def dockerfile(svc: dict[str, Any]) -> tuple[Path, Path]:
    build = svc["build"]
    context = (ROOT / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def exec_form(arguments: str) -> list[str]:
    value = yaml.safe_load(arguments)  # a JSON array is valid YAML
    assert isinstance(value, list), f"use the exec form (a JSON array): {arguments}"
    return [str(v) for v in value]


def vllm_sh_flags() -> dict[str, str | None]:
    """Every ``--flag`` launch/vllm.sh passes to vLLM, with its literal value if it has one."""
    command = VLLM_SH.read_text(encoding="utf-8").split("exec ", 1)[1]
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    flags: dict[str, str | None] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else None
            literal = nxt is not None and not nxt.startswith("--") and "$" not in nxt
            flags[word] = nxt if literal else None
    return flags


def max_num_seqs() -> str:
    return flag_value(argv(service("vllm")["command"]), "--max-num-seqs")


def gateway_env_names() -> set[str]:
    """The environment variables the gateway reads: those ``--help`` names, plus the keys."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_settings(["--help"], {})
    return set(re.findall(r"env\s+(\w+);", out.getvalue())) | {"GATEWAY_API_KEYS"}


def gateway_services() -> dict[str, dict[str, Any]]:
    """Every compose service that runs the gateway's image."""
    image = service("gateway")["image"]
    return {name: svc for name, svc in compose()["services"].items() if svc["image"] == image}


def aliases(name: str) -> set[str]:
    networks = service(name).get("networks", {})
    names = {name}
    if isinstance(networks, dict):
        for network in networks.values():
            names.update((network or {}).get("aliases", []))
    return names


# -- compose: structure and files --------------------------------------------------------------


def test_compose_has_the_stack_and_its_profiles() -> None:
    services = compose()["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {
        "vllm": ("gpu",),
        "vllm-cpu": ("cpu",),
        "gateway": (),
        "gateway-b": ("scale",),
        "redis": ("scale",),
        "prometheus": (),
        "grafana": (),
        "locust": ("loadtest",),
    }


def test_every_build_and_bind_mount_source_exists() -> None:
    for name, svc in compose()["services"].items():
        if "build" in svc:
            context, path = dockerfile(svc)
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert path.is_file(), f"{name}: {path} missing"
        for target, source in bind_mounts(svc).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) missing"


@pytest.mark.parametrize("name", ["gateway", "vllm-cpu"])
def test_dockerfile_copies_only_files_that_exist(name: str) -> None:
    context, path = dockerfile(service(name))
    ignored = (context / ".dockerignore").read_text(encoding="utf-8").split()
    for word, arguments in instructions(path):
        if word in ("COPY", "ADD") and "--from=" not in arguments:
            *sources, _ = [a for a in shlex.split(arguments) if not a.startswith("--")]
            for source in sources:
                # README.md too: pyproject.toml names it, and `pip install .` fails without it.
                assert (context / source).exists(), f"{path.name}: COPY {source} missing"
                top = source.split("/")[0]
                assert top not in ignored, f"{source} is excluded by .dockerignore"


# -- the gateway -------------------------------------------------------------------------------


def test_gateway_image_runs_the_gateway_on_its_default_port() -> None:
    steps = instructions(ROOT / "Dockerfile")
    first = {word: args for word, args in reversed(steps)}  # the first of each instruction
    last = dict(steps)
    assert first["FROM"] == "python:3.11-slim"
    assert "pip install ." in " ".join(args for word, args in steps if word == "RUN")
    assert last["USER"] not in ("root", "0"), "the gateway must not run as root"
    assert last["EXPOSE"] == str(GATEWAY_PORT)
    cmd = exec_form(last["CMD"])
    assert cmd[:3] == ["python", "-m", "gateway"]
    settings = parse_settings(cmd[3:], env={})
    assert (settings.host, settings.port) == ("0.0.0.0", GATEWAY_PORT)
    assert f"127.0.0.1:{GATEWAY_PORT}/health" in last["HEALTHCHECK"]


def test_gateway_service_reaches_vllm_with_a_matching_window() -> None:
    gateway = service("gateway")
    cmd = exec_form(dict(instructions(ROOT / "Dockerfile"))["CMD"])
    settings = parse_settings(cmd[3:], env=environment(gateway))
    assert settings.upstreams == (f"http://vllm:{VLLM_PORT}",)
    assert str(settings.window) == max_num_seqs()
    # Published on the host's loopback only: compose ships a development API key.
    assert [interpolate(p) for p in gateway["ports"]] == [
        f"127.0.0.1:{GATEWAY_PORT}:{GATEWAY_PORT}"
    ]
    assert settings.env_keys, "in a container the gateway needs API keys to listen beyond loopback"
    for name in ("vllm", "vllm-cpu"):
        assert "vllm" in aliases(name), f"{name} must answer to the name vllm"


def test_one_max_num_seqs_default_everywhere() -> None:
    defaults = set(re.findall(r"\$\{MAX_NUM_SEQS:-(\d+)\}", COMPOSE.read_text(encoding="utf-8")))
    assert len(defaults) == 1, f"MAX_NUM_SEQS has several defaults: {defaults}"
    assert environment(service("gateway"))["GATEWAY_WINDOW"] == max_num_seqs()


def test_gateway_services_set_only_settings_the_gateway_reads() -> None:
    known = gateway_env_names()
    assert set(gateway_services()) == {"gateway", "gateway-b"}
    for name, svc in gateway_services().items():
        names = set(environment(svc))
        assert names <= known, (name, names - known)


def test_scale_profile_runs_a_second_gateway_on_redis_and_the_default_needs_none() -> None:
    first, second = environment(service("gateway")), environment(service("gateway-b"))
    assert first.pop("GATEWAY_REDIS_URL") == ""  # unset: no Redis unless asked for
    url = urlsplit(second.pop("GATEWAY_REDIS_URL"))
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", REDIS_PORT)
    assert first == second, "the two gateways must differ only in their Redis setting"
    ports = {interpolate(p) for name in ("gateway", "gateway-b") for p in service(name)["ports"]}
    assert len(ports) == 2, "each gateway needs its own host port"
    redis = service("redis")
    assert argv(redis["command"])[:5] == ["redis-server", "--save", "", "--appendonly", "no"]
    # A service outside every profile may not need one inside a profile: the default
    # `docker compose --profile cpu up` would then fail, or start Redis after all.
    services = compose()["services"]
    for name, svc in services.items():
        if not svc.get("profiles"):
            for needed in svc.get("depends_on", []):
                assert not services[needed].get("profiles"), f"{name} depends on {needed}"


# -- vLLM --------------------------------------------------------------------------------------


def test_gpu_vllm_passes_every_flag_of_launch_vllm_sh() -> None:
    vllm = service("vllm")
    args = argv(vllm["command"])
    for flag, literal in vllm_sh_flags().items():
        assert flag in args, f"compose's vllm service lacks {flag} (launch/vllm.sh passes it)"
        if literal is not None:
            assert flag_value(args, flag) == literal, flag
    assert flag_value(args, "--host") == "0.0.0.0"
    assert flag_value(args, "--port") == str(VLLM_PORT)
    assert flag_value(args, "--model") == "Qwen/Qwen2.5-7B-Instruct"
    default_len = re.search(r"\$\{MAX_MODEL_LEN:-(\d+)\}", VLLM_SH.read_text(encoding="utf-8"))
    assert default_len, "launch/vllm.sh no longer defaults MAX_MODEL_LEN"
    assert flag_value(args, "--max-model-len") == default_len.group(1)
    # The same server module launch/vllm.sh runs (`vllm serve` fails for the CPU build).
    assert argv(vllm["entrypoint"])[-2:] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_launch_vllm_sh_has_the_flags_the_design_relies_on() -> None:
    flags = vllm_sh_flags()
    assert flags["--scheduling-policy"] == "priority"
    assert {"--enable-prefix-caching", "--max-num-seqs", "--port", "--host"} <= set(flags)
    # Function calling for Qwen2.5, and a model id in responses rather than a folder's path.
    assert flags["--tool-call-parser"] == "hermes"
    assert {"--enable-auto-tool-choice", "--served-model-name"} <= set(flags)


def test_gpu_vllm_reserves_gpus_and_keeps_the_model_cache() -> None:
    vllm = service("vllm")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert vllm["ipc"] == "host"
    targets = [str(v).split(":")[1] for v in vllm["volumes"]]
    assert "/root/.cache/huggingface" in targets
    assert f"127.0.0.1:{VLLM_PORT}/health" in " ".join(vllm["healthcheck"]["test"])


def test_cpu_vllm_starts_through_launch_vllm_sh() -> None:
    """The CPU image runs launch/vllm.sh itself, so its flags are vllm.sh's by construction."""
    svc = service("vllm-cpu")
    _, path = dockerfile(svc)
    steps = instructions(path)
    last = dict(steps)
    copied = " ".join(args for word, args in steps if word == "COPY")
    assert "launch/vllm.sh" in copied
    assert "launch/build_model.py" in copied
    assert exec_form(last["ENTRYPOINT"])[-1] == "/app/launch/vllm.sh"
    model, port, seqs, *extra = argv(svc["command"])
    assert port == str(VLLM_PORT)
    assert seqs == max_num_seqs()
    assert not set(extra) & set(vllm_sh_flags()), "do not repeat vllm.sh's flags"
    # The model the image builds is the one compose serves by default.
    assert f"build_model.py default --out {model}" in " ".join(a for w, a in steps if w == "RUN")
    assert exec_form(last["CMD"])[0] == model
    # vllm.sh listens on 127.0.0.1 unless told otherwise: other containers need 0.0.0.0.
    assert environment(svc)["VLLM_HOST"] == "0.0.0.0"


def test_cpu_image_installs_what_launch_common_sh_installs() -> None:
    common = COMMON_SH.read_text(encoding="utf-8")
    text = (ROOT / "deploy/vllm-cpu/Dockerfile").read_text(encoding="utf-8")
    for pin in ("TORCH_PIN", "VLLM_PIN"):
        value = re.search(rf'^{pin}="([^"]+)"', common, re.M)
        assert value, f"{pin} not found in launch/common.sh"
        assert f"ARG {pin}={value.group(1)}" in text, f"{pin} differs from launch/common.sh"
    removed = re.search(r"pip\" uninstall -y -q ([\w ]+)", common)
    assert removed, "the uninstall step was not found in launch/common.sh"
    assert f"pip uninstall -y {removed.group(1).strip()}" in text


# -- Prometheus and Grafana --------------------------------------------------------------------


def service_ports() -> dict[str, int]:
    """The port each scrapeable name listens on inside the compose network."""
    return {
        **{name: VLLM_PORT for name in aliases("vllm") | aliases("vllm-cpu")},
        "gateway": GATEWAY_PORT,
        "prometheus": 9090,
        "grafana": 3000,
    }


def test_prometheus_scrapes_the_gateway_and_vllm_where_they_listen() -> None:
    prometheus = service("prometheus")
    config_arg = next(a for a in argv(prometheus["command"]) if a.startswith("--config.file="))
    config_path = host_path(prometheus, config_arg.split("=", 1)[1])
    assert config_path == ROOT / "deploy/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert jobs == {"gateway": [f"gateway:{GATEWAY_PORT}"], "vllm": [f"vllm:{VLLM_PORT}"]}
    # The scale profile's gateways are found by DNS: only while they run.
    (gateway_job,) = (j for j in config["scrape_configs"] if j["job_name"] == "gateway")
    found = {(n, sd["port"]) for sd in gateway_job.get("dns_sd_configs", []) for n in sd["names"]}
    assert found == {(name, GATEWAY_PORT) for name in gateway_services()} - {
        ("gateway", GATEWAY_PORT)
    }
    ports = service_ports()
    for target in (t for ts in jobs.values() for t in ts):
        host, port = target.rsplit(":", 1)
        assert ports.get(host) == int(port), f"{target} is not a compose service's port"
    # The gateway labels upstreams host:port: the same as the vllm job's instance label.
    assert jobs["vllm"] == [urlsplit(environment(service("gateway"))["UPSTREAMS"]).netloc]


def test_grafana_provisioning_points_at_existing_files() -> None:
    grafana = service("grafana")
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    (datasource,) = sources["datasources"]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert service_ports().get(url.hostname or "") == url.port == 9090
    providers = yaml.safe_load((provisioning / "dashboards/qwen-gateway.yml").read_text())
    for provider in providers["providers"]:
        folder = host_path(grafana, provider["options"]["path"])
        assert (folder / "qwen-gateway.json").is_file(), f"no dashboard in {folder}"
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home).is_file()


def test_locust_targets_the_gateway_from_the_mounted_loadtest_folder() -> None:
    locust = service("locust")
    args = argv(locust["command"])
    locustfile = host_path(locust, flag_value(args, "-f"))
    assert locustfile.parent == ROOT / "loadtest"
    url = urlsplit(flag_value(args, "--host"))
    assert (url.hostname, url.port) == ("gateway", GATEWAY_PORT)
