"""Monitoring: metrics and health endpoints, Prometheus configuration, alert rules and Grafana dashboards.

The integration test runs the three services with metrics servers, lets a real
Prometheus scrape them during an end-to-end run and then evaluates every
dashboard query and every alert expression through Prometheus' HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from crc_medai import metrics
from crc_medai.kafka import create_producer, ensure_topics
from crc_medai.settings import REPO_ROOT, Settings
from infra.prometheus.config import ALERT_RULES, JOB_NAME, PROMETHEUS_DIR, render_config
from producers.frames import publish_video
from producers.records import publish_records
from schemas.messages import Frame, PatientRecord
from tests.conftest import RunningServices, isolated_settings

VIDEO = REPO_ROOT / "samples" / "video" / "procedure-demo.mp4"
RECORDS = REPO_ROOT / "samples" / "records"
DASHBOARDS = sorted((REPO_ROOT / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = REPO_ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
SERVICES = ("detection", "prognosis", "fhir-consumer")
MAX_FRAMES = 30
SCRAPE_INTERVAL_S = 1.0


def prometheus_binary(name: str) -> str:
    """Return the path of ``prometheus`` or ``promtool``, installing Debian's package when missing and root."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{name} is not installed; install it with `apt-get install prometheus` (needs root and apt-get)")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which(name)
    assert path is not None, f"apt-get installed prometheus, but {name} is not on PATH"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """Return (dashboard file, panel title, PromQL) for every query of every panel."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                queries.append((path.name, panel["title"], target["expr"]))
    return queries


def alert_expressions() -> list[tuple[str, str]]:
    """Return (alert name, expression) for every alert rule."""
    import yaml

    rules = yaml.safe_load(ALERT_RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


# Metrics server without the stack


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, metrics.Health]]:
    service_health = metrics.Health("test-service")
    server = metrics.MetricsServer("127.0.0.1", 0, service_health).start()
    host, port = server.address
    try:
        yield f"http://{host}:{port}", service_health
    finally:
        server.close()


def test_healthz_ok_while_not_ready(metrics_server: tuple[str, metrics.Health]) -> None:
    url, _ = metrics_server

    status, body = http_get(f"{url}/healthz")

    assert status == 200
    assert json.loads(body)["status"] == "alive"


def test_readyz_reports_failing_check(metrics_server: tuple[str, metrics.Health]) -> None:
    url, service_health = metrics_server
    service_health.started = True
    service_health.add_check("broker", lambda: metrics.check_reachable(f"127.0.0.1:{free_port()}", "Kafka"))

    status, body = http_get(f"{url}/readyz")
    checks = json.loads(body)["checks"]

    assert status == 503
    assert checks["worker"] == "started"
    assert checks["broker"].startswith("failed: Kafka not reachable")


def test_readyz_ready_when_checks_pass(metrics_server: tuple[str, metrics.Health], tmp_path: Path) -> None:
    url, service_health = metrics_server
    service_health.started = True
    service_health.add_check("store", lambda: metrics.check_writable(tmp_path / "not-yet-created"))

    status, body = http_get(f"{url}/readyz")

    assert status == 200
    assert json.loads(body)["checks"]["store"].startswith("ok")


def test_readyz_not_ready_before_worker_starts(metrics_server: tuple[str, metrics.Health]) -> None:
    url, _ = metrics_server

    status, body = http_get(f"{url}/readyz")

    assert status == 503
    assert json.loads(body)["checks"]["worker"] == "not started"


def test_metrics_endpoint_exposes_crc_metrics(metrics_server: tuple[str, metrics.Health]) -> None:
    url, _ = metrics_server
    metrics.record_dead_letter("fhir-consumer", "test.findings")

    status, body = http_get(f"{url}/metrics")
    text = body.decode()

    assert status == 200
    assert 'crc_records_dead_lettered_total{service="fhir-consumer",topic="test.findings"}' in text
    assert 'crc_fhir_deliveries_total{outcome="failed"}' in text
    assert "crc_inference_duration_seconds" in text
    assert "process_resident_memory_bytes" in text


def test_unknown_path_is_404(metrics_server: tuple[str, metrics.Health]) -> None:
    url, _ = metrics_server

    status, _ = http_get(f"{url}/nothing-here")

    assert status == 404


def test_metrics_server_off_when_port_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRC_METRICS_PORT", "0")
    settings = Settings()

    assert metrics.metrics_port(settings) == 0
    assert metrics.start_metrics_server(settings, "test-service") is None


# Configuration checked by promtool and by reading the dashboards


def test_promtool_accepts_alert_rules() -> None:
    promtool = prometheus_binary("promtool")

    result = subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_in_promtool_unit_tests() -> None:
    promtool = prometheus_binary("promtool")

    result = subprocess.run(
        [promtool, "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "config",
    [
        PROMETHEUS_DIR / "prometheus.yml",
        None,  # rendered for the integration test's loopback ports
    ],
    ids=["compose", "rendered"],
)
def test_promtool_accepts_config(config: Path | None, tmp_path: Path) -> None:
    promtool = prometheus_binary("promtool")
    if config is None:
        config = tmp_path / "prometheus.yml"
        targets = {service: f"127.0.0.1:{9400 + index}" for index, service in enumerate(SERVICES)}
        config.write_text(render_config(targets, scrape_interval_s=SCRAPE_INTERVAL_S))

    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_use_provisioned_datasource() -> None:
    import yaml

    uids = {source["uid"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}

    assert {path.name for path in DASHBOARDS} == {"overview.json", "models.json"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panel_ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(panel_ids) == len(set(panel_ids)), f"{path.name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] in uids, f"{path.name}: {panel['title']}"
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"


def test_labels_carry_no_identifiers() -> None:
    allowed = {"service", "topic", "partition", "model", "reason", "outcome", "le"}
    families = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]

    assert len(families) >= 12
    for family in families:
        assert set(family._labelnames) <= allowed, family._name


# Real services scraped by a real Prometheus


class Prometheus:
    """A Prometheus server on loopback with its own configuration and data folder."""

    def __init__(self, binary: str, folder: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(render_config(targets, scrape_interval_s=SCRAPE_INTERVAL_S))
        self.log_path = folder / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if http_get(f"{self.url}/-/ready", timeout_s=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout_s:.0f} s: {self.log_path.read_text()[-2000:]}")

    def query(self, expression: str) -> dict[str, object]:
        """Evaluate ``expression`` now; return the API's JSON body (status, data or error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        return json.loads(http_get(url)[1])

    def value(self, expression: str) -> float:
        """Return the single value of a scalar-like expression, 0 when it has no result."""
        result = self.query(expression)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_with_metrics_port(services: RunningServices, name: str, port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start service ``name`` with its metrics server on ``port``."""
    if "metrics_port" in Settings.model_fields:
        services.settings = services.settings.model_copy(update={"metrics_port": port})
    else:
        monkeypatch.setenv("CRC_METRICS_PORT", str(port))
    services.start(name)


def wait_until(condition, timeout_s: float, description: str, services: RunningServices) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if services.any_stopped():
            raise AssertionError(f"a service stopped while waiting for {description}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {description}")


def detection_weights(settings: Settings, folder: Path) -> Path:
    """Return the shipped detector weights, or an untrained detector's when none are shipped yet.

    The metrics do not depend on what the model predicts, so an untrained one serves this test.
    """
    if settings.detection_model_path.is_file():
        return settings.detection_model_path
    from processors.detection.model import PolypDetector

    path = folder / "untrained-polyp-unet.pt"
    PolypDetector.create(version="0.0.0-untrained").save(path)
    return path


async def publish_bad_input(settings: Settings) -> None:
    """Publish one undecodable frame and one unreadable record, so dead-letter series have data."""
    await ensure_topics(settings)
    producer = create_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(Frame.topic), key=b"proc-monitoring", value=b"not a frame")
        await producer.send_and_wait(settings.topic(PatientRecord.topic), key=b"pt-monitoring", value=b"{")
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def scraped_run(
    stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Prometheus, dict[str, str]]]:
    """Run services and Prometheus through a short end-to-end run; yield Prometheus and /readyz per service."""
    binary = prometheus_binary("prometheus")
    folder = tmp_path_factory.mktemp("monitoring")
    settings = isolated_settings(stack, folder / "out")
    settings = settings.model_copy(update={"detection_model_path": detection_weights(settings, folder)})
    ports = {name: free_port() for name in SERVICES}
    services = RunningServices(settings, folder / "logs")
    monkeypatch = pytest.MonkeyPatch()
    prometheus = Prometheus(binary, folder / "prometheus", {name: f"127.0.0.1:{port}" for name, port in ports.items()})
    try:
        for name, port in ports.items():
            start_with_metrics_port(services, name, port, monkeypatch)
        prometheus.wait_ready()

        def all_ready() -> bool:
            try:
                return all(http_get(f"http://127.0.0.1:{port}/readyz", 2.0)[0] == 200 for port in ports.values())
            except OSError:
                return False

        wait_until(all_ready, 120, "every service's /readyz to return 200", services)
        readiness = {name: http_get(f"http://127.0.0.1:{port}/readyz")[1].decode() for name, port in ports.items()}

        asyncio.run(publish_bad_input(settings))
        records = asyncio.run(publish_records(settings, [RECORDS]))
        frames = asyncio.run(publish_video(settings, VIDEO, "proc-monitoring", realtime=False, max_frames=MAX_FRAMES))
        patients = len(records.published)

        # The detection processor skips frames older than its latency budget, so a frame is either run or skipped.
        frames_handled = 'sum(crc_frames_processed_total) + sum(crc_frames_skipped_total{reason!="rejected"})'

        def pipeline_scraped() -> bool:
            return (
                prometheus.value(frames_handled) >= frames.frames_published
                and prometheus.value('sum(crc_fhir_deliveries_total{outcome="succeeded"})') >= patients
                and prometheus.value("sum(crc_records_dead_lettered_total)") >= 2
            )

        wait_until(pipeline_scraped, 150, "Prometheus to scrape every frame, delivery and dead letter", services)
        # Rules run every scrape interval; give them a few rounds after the last increase.
        time.sleep(5 * SCRAPE_INTERVAL_S)
        yield prometheus, readiness
    finally:
        prometheus.stop()
        services.stop()
        monkeypatch.undo()
        print(services.logs())
        print(prometheus.log_path.read_text(errors="replace")[-2000:])


@pytest.mark.integration
def test_services_were_ready(scraped_run: tuple[Prometheus, dict[str, str]]) -> None:
    _, readiness = scraped_run

    for name, body in readiness.items():
        checks = json.loads(body)["checks"]
        assert checks["worker"] == "started", name
        assert checks["broker"].startswith("ok"), name
    assert json.loads(readiness["detection"])["checks"]["store"].startswith("ok bucket")
    assert json.loads(readiness["fhir-consumer"])["checks"]["store"].startswith("ok")


@pytest.mark.integration
def test_every_service_scraped(scraped_run: tuple[Prometheus, dict[str, str]]) -> None:
    prometheus, _ = scraped_run

    result = prometheus.query(f'up{{job="{JOB_NAME}"}} == 1')["data"]["result"]

    assert sorted(series["metric"]["service"] for series in result) == sorted(SERVICES)


@pytest.mark.integration
def test_model_versions_scraped(scraped_run: tuple[Prometheus, dict[str, str]]) -> None:
    prometheus, _ = scraped_run

    result = prometheus.query("crc_model_info")["data"]["result"]
    by_service = {series["metric"]["service"]: series["metric"] for series in result}

    assert sorted(by_service) == ["detection", "prognosis"]
    for labels in by_service.values():
        assert labels["model"]
        assert labels["version"]
        assert "exported_service" not in labels


@pytest.mark.integration
def test_lag_reported_for_input_partitions(scraped_run: tuple[Prometheus, dict[str, str]], stack: Settings) -> None:
    prometheus, _ = scraped_run

    result = prometheus.query('crc_consumer_lag_messages{service="detection"}')["data"]["result"]
    topics = {series["metric"]["topic"] for series in result}
    partitions = sorted(series["metric"]["partition"] for series in result)

    assert len(topics) == 1
    assert topics.pop().endswith(".frames")
    assert partitions == [str(partition) for partition in range(stack.topic_partitions)]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("dashboard", "panel", "expression"), dashboard_queries(), ids=[f"{d}:{p}" for d, p, _ in dashboard_queries()]
)
def test_dashboard_query_returns_data(
    scraped_run: tuple[Prometheus, dict[str, str]], dashboard: str, panel: str, expression: str
) -> None:
    prometheus, _ = scraped_run

    response = prometheus.query(expression)

    assert response["status"] == "success", response.get("error")
    assert response["data"]["result"], f"{dashboard} panel {panel!r} returned no data: {expression}"


@pytest.mark.integration
@pytest.mark.parametrize(("alert", "expression"), alert_expressions(), ids=[name for name, _ in alert_expressions()])
def test_alert_expression_evaluates(
    scraped_run: tuple[Prometheus, dict[str, str]], alert: str, expression: str
) -> None:
    prometheus, _ = scraped_run

    response = prometheus.query(expression)

    assert response["status"] == "success", f"{alert}: {response.get('error')}"


@pytest.mark.integration
def test_rules_loaded_and_healthy(scraped_run: tuple[Prometheus, dict[str, str]]) -> None:
    prometheus, _ = scraped_run

    groups = json.loads(http_get(f"{prometheus.url}/api/v1/rules")[1])["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]

    assert {rule["name"] for rule in rules} == {name for name, _ in alert_expressions()}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
