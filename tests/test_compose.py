"""compose.yaml: static checks, because Docker is not available on the test machines."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from crc_medai.cli import build_parser
from crc_medai.settings import REPO_ROOT

COMPOSE_PATH = REPO_ROOT / "compose.yaml"
PROJECT_IMAGE = "crc-medai"

# Environment variables each third-party image documents; every other name must start with CRC_.
IMAGE_VARIABLES: dict[str, re.Pattern[str]] = {
    "apache/kafka": re.compile(r"KAFKA_[A-Z0-9_]+|CLUSTER_ID"),
    "quay.io/minio/minio": re.compile(r"MINIO_ROOT_USER|MINIO_ROOT_PASSWORD"),
    "redis": re.compile(r"(?!)"),
}

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def load_compose() -> dict[str, Any]:
    """Parse compose.yaml (YAML merge keys resolved)."""
    return yaml.safe_load(COMPOSE_PATH.read_text())


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def image_name(service: dict[str, Any]) -> str:
    """Return an image reference without its tag."""
    return service.get("image", "").rsplit(":", 1)[0]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment as a dict, from either list or map form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {name: "" if value is None else str(value) for name, value in raw.items()}


def host_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """Return the (host ip, host port) pairs a service publishes."""
    published = []
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 3:
            published.append((parts[0], int(parts[1])))
        elif len(parts) == 2:
            published.append(("0.0.0.0", int(parts[0])))
    return published


def test_compose_top_level_keys() -> None:
    allowed = {"name", "services", "volumes", "networks", "secrets", "configs", "include"}

    unknown = {key for key in COMPOSE if key not in allowed and not key.startswith("x-")}

    assert not unknown
    assert "version" not in COMPOSE, "the Compose specification ignores `version`; remove it"
    assert {"kafka", "redis", "minio", "detection", "prognosis", "fhir-consumer"} <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_image_or_build(name: str) -> None:
    service = SERVICES[name]

    assert "image" in service or "build" in service

    image = service.get("image", "")
    if image and "build" not in service:
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag, f"{name}: image {image!r} has no tag; pin a release"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if "build" in SERVICES[name]))
def test_build_context_and_dockerfile_exist(name: str) -> None:
    build = SERVICES[name]["build"]
    context = REPO_ROOT / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")

    assert context.is_dir(), f"{name}: build context {context} is missing"
    assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} is missing"


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


def test_host_ports_unique() -> None:
    seen: dict[int, str] = {}

    for name, service in SERVICES.items():
        for _, port in host_ports(service):
            assert port not in seen, f"host port {port} is published by both {seen[port]} and {name}"
            seen[port] = name

    assert seen, "no host ports published"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_healthy_services(name: str) -> None:
    depends_on = SERVICES[name].get("depends_on", {})
    if isinstance(depends_on, list):
        depends_on = {dependency: {"condition": "service_started"} for dependency in depends_on}

    for dependency, options in depends_on.items():
        assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        if options.get("condition") == "service_healthy":
            assert "healthcheck" in SERVICES[dependency], f"{name} waits for {dependency}, which has no healthcheck"


@pytest.mark.parametrize("name", ["kafka", "redis", "minio"])
def test_infrastructure_healthcheck_and_restart(name: str) -> None:
    service = SERVICES[name]

    assert service["healthcheck"]["test"]
    assert service["restart"] in {"always", "unless-stopped", "on-failure"}


def test_kafka_runs_kraft() -> None:
    kafka = environment(SERVICES["kafka"])

    assert SERVICES["kafka"]["image"] == "apache/kafka:3.9.1"
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    assert "zookeeper" not in SERVICES


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if image_name(SERVICES[name]) == PROJECT_IMAGE))
def test_project_command_parses(name: str) -> None:
    service = SERVICES[name]
    parser = build_parser()

    parser.parse_args(service["command"])

    assert environment(service)["CRC_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert service["restart"] == ("no" if "profiles" in service else "unless-stopped")


@pytest.mark.parametrize("name", ["frame-producer", "record-producer"])
def test_producer_inputs_exist(name: str) -> None:
    paths = [argument for argument in SERVICES[name]["command"] if argument.startswith("/app/")]

    assert paths, f"{name} names no input file"
    for path in paths:
        assert (REPO_ROOT / path.removeprefix("/app/")).exists(), f"{name}: {path} is not in the repository"


def test_dockerfile_rules() -> None:
    dockerfile = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    instructions = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]

    assert instructions[0].startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1] not in {"root", "0"}
    assert re.search(r"pip install\b[^\n]*\s\.(\s|$)", dockerfile, re.MULTILINE), "the image must `pip install .`"
    assert 'ENTRYPOINT ["crc-medai"]' in instructions


def test_dockerignore_beside_dockerfile() -> None:
    ignore = (REPO_ROOT / "infra" / "docker" / "Dockerfile.dockerignore").read_text().split()

    assert ".git" in ignore
    assert ".venv" in ignore
