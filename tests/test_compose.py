"""compose.yaml, its GPU override and the Dockerfiles: static checks, because Docker is not available on the test
machines.

Every image, build context, Dockerfile, mounted file and port they name must
exist and agree with the settings, the Prometheus configuration and the Grafana
provisioning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from crc_medai.cli import FHIR_TOOLS, PROGNOSIS_TOOLS, build_parser, main
from crc_medai.cli import SERVICES as WORKER_SERVICES
from crc_medai.settings import REPO_ROOT, Settings
from infra.prometheus.config import COMPOSE_METRICS_PORT, render_compose_config

COMPOSE_PATH = REPO_ROOT / "compose.yaml"
GPU_OVERRIDE_PATH = REPO_ROOT / "infra" / "docker" / "compose.gpu.yaml"
PROMETHEUS_CONFIG = REPO_ROOT / "infra" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = REPO_ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = REPO_ROOT / "grafana" / "provisioning" / "dashboards" / "crc-medai.yml"
DOCKERFILES = [REPO_ROOT / "infra" / "docker" / "Dockerfile", REPO_ROOT / "infra" / "docker" / "Dockerfile.cuda"]
PROJECT_IMAGES = {"crc-medai", "crc-medai-cuda"}
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}

#: Subcommands that parse their own arguments: `crc-medai` passes them on unparsed.
SELF_PARSING_TOOLS = {*PROGNOSIS_TOOLS, *FHIR_TOOLS}

#: Faust workers among the subcommands: they share a consumer group, so compose can scale them.
FAUST_WORKERS = {*WORKER_SERVICES, "fhir-view", "fhir-delivery"}

#: One-shot jobs, run with `docker compose --profile producers run --rm <job>`.
ONE_SHOT_JOBS = {"frame-producer", "record-producer", "hl7-producer"}

#: CRC_ variables read outside crc_medai.settings.Settings, with their defaults.
OTHER_CRC_VARIABLES = {"CRC_LOG_LEVEL": "INFO"}  # crc_medai.logs.configure_logging

# Environment variables each third-party image documents; every other name must start with CRC_.
IMAGE_VARIABLES: dict[str, re.Pattern[str]] = {
    "apache/kafka": re.compile(r"KAFKA_[A-Z0-9_]+|CLUSTER_ID"),
    "quay.io/minio/minio": re.compile(r"MINIO_ROOT_USER|MINIO_ROOT_PASSWORD"),
    "redis": re.compile(r"(?!)"),
    "prom/prometheus": re.compile(r"(?!)"),
    "grafana/grafana": re.compile(r"GF_[A-Z0-9_]+"),
}

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML file (merge keys resolved)."""
    return yaml.safe_load(path.read_text())


COMPOSE = load_yaml(COMPOSE_PATH)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
GPU_OVERRIDE = load_yaml(GPU_OVERRIDE_PATH)


def image_name(service: dict[str, Any]) -> str:
    """Return an image reference without its tag."""
    return service.get("image", "").rsplit(":", 1)[0]


def image_tag(image: str) -> str:
    """Return the tag of an image reference, or "" when it has none."""
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else ""


def environment(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment as a dict, from either list or map form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {name: "" if value is None else str(value) for name, value in raw.items()}


def interpolation_default(value: str) -> str:
    """Return the value compose uses when the variable of ``${NAME:-default}`` is unset."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", value)
    return match.group(1) if match else value


def port_mappings(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Return the (host ip, host port, container port) of every port a service publishes."""
    published = []
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 3:
            published.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            published.append(("0.0.0.0", int(parts[0]), int(parts[1])))
        else:
            published.append(("0.0.0.0", int(parts[0]), int(parts[0])))
    return published


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Return (host path, container path, options) of every bind mount, skipping named volumes."""
    mounts = []
    for entry in service.get("volumes", []):
        source, target, *options = str(entry).split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target, options[0] if options else ""))
    return mounts


def subcommand(service: dict[str, Any]) -> str | None:
    """Return the `crc-medai` subcommand a project service runs, None for third-party images."""
    if image_name(service) not in PROJECT_IMAGES:
        return None
    return service["command"][0]


def long_running() -> list[str]:
    return sorted(name for name in SERVICES if name not in ONE_SHOT_JOBS)


def worker_services() -> list[str]:
    """Return the compose services that run a Faust worker."""
    return sorted(name for name, service in SERVICES.items() if subcommand(service) in FAUST_WORKERS)


def metrics_services() -> list[str]:
    """Return the compose services whose health check probes /readyz, which the metrics server serves."""
    return sorted(
        name for name in long_running() if "/readyz" in " ".join(SERVICES[name].get("healthcheck", {}).get("test", []))
    )


# Layout of the file


def test_compose_top_level_keys() -> None:
    allowed = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}

    unknown = {key for key in COMPOSE if key not in allowed and not key.startswith("x-")}

    assert not unknown
    assert "version" not in COMPOSE, "the Compose specification ignores `version`; remove it"
    expected = {"kafka", "redis", "minio", "prometheus", "grafana", "detection", "prognosis", "fhir-consumer"}
    assert expected <= set(SERVICES)


def test_named_volumes_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})

    for name, service in SERVICES.items():
        for entry in service.get("volumes", []):
            source = str(entry).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared under top-level volumes"


# Images and builds


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_image_pinned(name: str) -> None:
    service = SERVICES[name]
    image = service.get("image", "")

    assert image, f"{name}: no image; name the image so that builds and scaled replicas share it"
    tag = image_tag(image)
    assert tag, f"{name}: image {image!r} has no tag; pin a release"
    assert tag != "latest", f"{name}: image {image!r} is not pinned"
    if "build" in service:
        assert image_name(service) in PROJECT_IMAGES, f"{name}: builds {image!r}, not a project image"


@pytest.mark.parametrize(
    ("source", "name"),
    [("compose.yaml", name) for name in sorted(SERVICES) if "build" in SERVICES[name]]
    + [("compose.gpu.yaml", name) for name in sorted(GPU_OVERRIDE["services"])],
)
def test_build_context_and_dockerfile_exist(source: str, name: str) -> None:
    services = SERVICES if source == "compose.yaml" else GPU_OVERRIDE["services"]
    build = services[name]["build"]
    # Compose resolves paths in every file of a project against the folder of the first file, compose.yaml.
    context = REPO_ROOT / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")

    assert context.is_dir(), f"{source} {name}: build context {context} is missing"
    assert dockerfile.is_file(), f"{source} {name}: Dockerfile {dockerfile} is missing"
    assert dockerfile.with_name(dockerfile.name + ".dockerignore").is_file(), f"{dockerfile} has no .dockerignore"


# Configuration by environment


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_environment_names(name: str) -> None:
    service = SERVICES[name]
    documented = IMAGE_VARIABLES.get(image_name(service))

    for variable, value in environment(service).items():
        if not variable.startswith("CRC_"):
            assert documented is not None, f"{name}: {variable} is not a CRC_ setting"
            assert documented.fullmatch(variable), f"{name}: {variable} is not documented for {image_name(service)}"
        for interpolated in _INTERPOLATION.findall(value):
            assert interpolated.startswith("CRC_"), f"{name}: {variable} reads ${interpolated}, not a CRC_ variable"


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if image_name(SERVICES[name]) in PROJECT_IMAGES))
def test_project_settings_exist_with_same_defaults(name: str) -> None:
    defaults = Settings.model_fields

    for variable, value in environment(SERVICES[name]).items():
        field = variable.removeprefix("CRC_").lower()
        if variable in OTHER_CRC_VARIABLES:
            expected = OTHER_CRC_VARIABLES[variable]
        else:
            assert field in defaults, f"{name}: {variable} sets no field of crc_medai.settings.Settings"
            expected = str(defaults[field].default)
        if value.startswith("${") and ":-" in value:
            default = interpolation_default(value)
            assert default == expected, f"{name}: {variable} defaults to {default!r} in compose, {expected!r} in code"


# Ports


def test_host_ports_unique() -> None:
    seen: dict[int, str] = {}

    for name, service in SERVICES.items():
        for _, port, _ in port_mappings(service):
            assert port not in seen, f"host port {port} is published by both {seen[port]} and {name}"
            seen[port] = name

    assert seen, "no host ports published"


def test_host_ports_only_on_loopback() -> None:
    for name, service in SERVICES.items():
        for host_ip, port, _ in port_mappings(service):
            assert host_ip == "127.0.0.1", f"{name}: port {port} is published on {host_ip}, not loopback"


@pytest.mark.parametrize(
    ("service", "setting", "container_port"),
    [("kafka", "kafka_bootstrap_servers", 19092), ("minio", "minio_endpoint", 9000), ("redis", "redis_url", 6379)],
)
def test_host_ports_match_setting_defaults(service: str, setting: str, container_port: int) -> None:
    default = str(Settings.model_fields[setting].default)
    host_port = int(re.search(r":(\d+)", default.removeprefix("redis://")).group(1))

    assert (("127.0.0.1", host_port, container_port)) in port_mappings(SERVICES[service])


def test_container_addresses_match_servers() -> None:
    project = environment(SERVICES["detection"])

    assert project["CRC_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "PLAINTEXT://kafka:9092" in environment(SERVICES["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert project["CRC_MINIO_ENDPOINT"] == "minio:9000"
    assert ["--address", ":9000"] == SERVICES["minio"]["command"][2:4]
    assert urlsplit(project["CRC_REDIS_URL"]).netloc == "redis:6379"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_scalable_unless_port_published(name: str) -> None:
    service = SERVICES[name]

    assert "container_name" not in service, f"{name}: container_name prevents `docker compose up --scale`"
    if name in worker_services():
        assert not service.get("ports"), f"{name}: a fixed host port prevents `docker compose up --scale`"


# Health checks, restart policies and start order


@pytest.mark.parametrize("name", long_running())
def test_healthcheck_and_restart(name: str) -> None:
    service = SERVICES[name]

    assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"
    assert not service["healthcheck"].get("disable"), f"{name}: health check disabled"
    assert service["restart"] in RESTART_POLICIES, f"{name}: restart {service.get('restart')!r}"


@pytest.mark.parametrize("name", sorted(ONE_SHOT_JOBS))
def test_one_shot_jobs_behind_profile(name: str) -> None:
    service = SERVICES[name]

    assert service.get("profiles"), f"{name}: a job would run on every `docker compose up`"
    assert service["restart"] == "no"
    assert service["healthcheck"] == {"disable": True}


def test_workers_serve_metrics() -> None:
    assert set(worker_services()) <= set(metrics_services())
    assert {"detection", "prognosis", "fhir-consumer"} <= set(worker_services())


@pytest.mark.parametrize("name", metrics_services())
def test_readyz_healthcheck_on_metrics_port(name: str) -> None:
    service = SERVICES[name]
    test = service["healthcheck"]["test"]

    assert test[:3] == ["CMD", "python", "-c"], "slim images have no curl: probe with python -c"
    compile(test[3], f"{name} healthcheck", "exec")
    assert "/readyz" in test[3]
    assert "os.environ['CRC_METRICS_PORT']" in test[3]
    assert environment(service)["CRC_METRICS_PORT"] == str(COMPOSE_METRICS_PORT)
    assert environment(service)["CRC_METRICS_HOST"] == "0.0.0.0"


@pytest.mark.parametrize(
    "name", sorted(name for name in long_running() if SERVICES[name]["healthcheck"]["test"][1] == "python")
)
def test_python_healthcheck_compiles(name: str) -> None:
    code = SERVICES[name]["healthcheck"]["test"][3]

    compile(code, f"{name} healthcheck", "exec")
    assert "urlopen" in code


@pytest.mark.parametrize(
    "name", sorted(name for name in long_running() if "--port" in SERVICES[name].get("command", []))
)
def test_http_service_port_matches_command(name: str) -> None:
    service = SERVICES[name]
    command = service["command"]
    port = int(command[command.index("--port") + 1])

    assert f"127.0.0.1:{port}/" in service["healthcheck"]["test"][3]
    assert port in [container_port for _, _, container_port in port_mappings(service)]
    assert command[command.index("--host") + 1] == "0.0.0.0", f"{name} must listen on every interface of its container"


def test_hl7_listener_port_published() -> None:
    service = SERVICES["hl7-listener"]
    listener = environment(service)

    assert listener["CRC_HL7_LISTENER_HOST"] == "0.0.0.0"
    assert ("127.0.0.1", 2575, int(listener["CRC_HL7_LISTENER_PORT"])) in port_mappings(service)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_healthy_services(name: str) -> None:
    depends_on = SERVICES[name].get("depends_on", {})
    if isinstance(depends_on, list):
        depends_on = {dependency: {"condition": "service_started"} for dependency in depends_on}

    for dependency, options in depends_on.items():
        assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        if options.get("condition") == "service_healthy":
            assert "healthcheck" in SERVICES[dependency], f"{name} waits for {dependency}, which has no healthcheck"


def test_kafka_runs_kraft() -> None:
    kafka = environment(SERVICES["kafka"])

    assert SERVICES["kafka"]["image"] == "apache/kafka:3.9.1"
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    assert "zookeeper" not in SERVICES


# Commands and inputs of the project image


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if image_name(SERVICES[name]) in PROJECT_IMAGES))
def test_project_command_parses(name: str) -> None:
    service = SERVICES[name]
    parser = build_parser()

    # test_tool_options_exist checks the arguments of the tools that parse their own.
    if service["command"][0] not in SELF_PARSING_TOOLS:
        parser.parse_args(service["command"])

    assert environment(service)["CRC_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert service["restart"] == ("no" if name in ONE_SHOT_JOBS else "unless-stopped")


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if subcommand(SERVICES[name]) in SELF_PARSING_TOOLS))
def test_tool_options_exist(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    command = SERVICES[name]["command"]

    with pytest.raises(SystemExit) as exit_info:
        main([command[0], "--help"])
    usage = capsys.readouterr().out

    assert exit_info.value.code == 0
    for option in (argument for argument in command[1:] if argument.startswith("--")):
        assert option in usage, f"{name}: `crc-medai {command[0]}` has no option {option}"


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if image_name(SERVICES[name]) in PROJECT_IMAGES))
def test_command_inputs_exist(name: str) -> None:
    paths = [argument for argument in SERVICES[name]["command"] if argument.startswith("/app/")]

    for path in paths:
        assert (REPO_ROOT / path.removeprefix("/app/")).exists(), f"{name}: {path} is not in the repository"


def test_producers_name_inputs() -> None:
    for name in sorted(ONE_SHOT_JOBS):
        assert any(argument.startswith("/app/") for argument in SERVICES[name]["command"]), name


# Prometheus and Grafana


def test_prometheus_config_is_rendered_compose_config() -> None:
    assert PROMETHEUS_CONFIG.read_text() == render_compose_config(), (
        "infra/prometheus/prometheus.yml is stale; run `python -m infra.prometheus.config > "
        "infra/prometheus/prometheus.yml`"
    )


def test_prometheus_scrapes_every_metrics_service() -> None:
    config = json.loads(PROMETHEUS_CONFIG.read_text())
    targets: dict[str, int] = {}

    for job in config["scrape_configs"]:
        assert "static_configs" not in job, "static targets reach one replica of a scaled service; use dns_sd_configs"
        for discovery in job["dns_sd_configs"]:
            assert discovery["type"] == "A"
            targets.update({name: discovery["port"] for name in discovery["names"]})

    assert sorted(targets) == metrics_services()
    for name, port in targets.items():
        assert environment(SERVICES[name])["CRC_METRICS_PORT"] == str(port), name


def test_prometheus_mounts_config_and_rules() -> None:
    prometheus = SERVICES["prometheus"]
    mounts = {target: (REPO_ROOT / source, options) for source, target, options in bind_mounts(prometheus)}
    config_flag = next(flag for flag in prometheus["command"] if flag.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])

    assert mounts[str(config_path)][0] == PROMETHEUS_CONFIG
    for rule_file in json.loads(PROMETHEUS_CONFIG.read_text())["rule_files"]:
        target = str(config_path.parent / rule_file)
        assert target in mounts, f"rule file {rule_file} is not mounted at {target}"
        assert mounts[target][0] == PROMETHEUS_CONFIG.parent / rule_file


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_bind_mounts_exist_and_read_only(name: str) -> None:
    for source, target, options in bind_mounts(SERVICES[name]):
        path = REPO_ROOT / source
        assert path.exists(), f"{name}: {source} (mounted at {target}) is not in the repository"
        assert options == "ro", f"{name}: {source} is mounted writable; configuration mounts are read-only"


def test_grafana_datasource_reaches_prometheus() -> None:
    datasource = load_yaml(GRAFANA_DATASOURCES)["datasources"][0]
    url = urlsplit(datasource["url"])
    listen = next(flag for flag in SERVICES["prometheus"]["command"] if flag.startswith("--web.listen-address="))

    assert url.hostname in SERVICES
    assert url.hostname == "prometheus"
    assert str(url.port) == listen.rsplit(":", 1)[1]


def test_grafana_mounts_provisioning_and_dashboards() -> None:
    mounts = {target: REPO_ROOT / source for source, target, _ in bind_mounts(SERVICES["grafana"])}
    dashboards_path = load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]

    assert mounts["/etc/grafana/provisioning"] == REPO_ROOT / "grafana" / "provisioning"
    assert mounts[dashboards_path] == REPO_ROOT / "grafana" / "dashboards"
    assert sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json")), "no dashboards to provision"


def test_grafana_admin_password_required() -> None:
    password = environment(SERVICES["grafana"])["GF_SECURITY_ADMIN_PASSWORD"]

    assert password.startswith("${CRC_GRAFANA_ADMIN_PASSWORD:?"), "Grafana must not start with its default password"


# GPU override


def test_gpu_override_reserves_gpu_for_detection() -> None:
    overrides = GPU_OVERRIDE["services"]

    assert set(overrides) <= set(SERVICES)
    detection = overrides["detection"]
    assert image_tag(detection["image"]) not in {"", "latest"}
    assert image_name(detection) in PROJECT_IMAGES
    devices = detection["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "container_name" not in detection
    assert "ports" not in detection


def test_gpu_override_requires_cuda_device() -> None:
    overrides = environment(GPU_OVERRIDE["services"]["detection"])

    assert overrides == {"CRC_DETECTION_DEVICE": "cuda"}
    assert Settings(detection_device=overrides["CRC_DETECTION_DEVICE"]).detection_device == "cuda"


# Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[path.name for path in DOCKERFILES])
def test_dockerfile_rules(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm", instructions[0]), "pin a slim Python patch release"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1] not in {"root", "0"}
    assert re.search(r"pip install\b[^\n]*\s\.(\s|$)", text, re.MULTILINE), "the image must `pip install .`"
    assert 'ENTRYPOINT ["crc-medai"]' in instructions


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[path.name for path in DOCKERFILES])
def test_dockerfile_model_paths_exist(dockerfile: Path) -> None:
    paths = re.findall(r"CRC_[A-Z_]+_MODEL_PATH=(\S+)", dockerfile.read_text())

    assert len(paths) == 2
    for path in paths:
        assert (REPO_ROOT / path.removeprefix("/app/")).is_file(), f"{dockerfile.name}: {path} is not shipped"
    assert Path(paths[1]).name == Settings.model_fields["prognosis_model_path"].default.name


def test_cuda_dockerfile_uses_cuda_wheels() -> None:
    text = (REPO_ROOT / "infra" / "docker" / "Dockerfile.cuda").read_text()

    assert "download.pytorch.org/whl/cpu" not in text, "the CPU index would install torch without CUDA"
    assert "NVIDIA_VISIBLE_DEVICES=all" in text
    assert 'CMD ["detection"]' in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[path.name for path in DOCKERFILES])
def test_dockerignore_beside_dockerfile(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().split()

    assert ".git" in ignore
    assert ".venv" in ignore
