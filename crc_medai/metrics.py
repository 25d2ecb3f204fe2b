"""Prometheus metrics and the health endpoints every service serves.

Each service process serves, on ``CRC_METRICS_PORT`` (0 turns the server off):

- ``/metrics``: the metrics below plus prometheus_client's process metrics
  (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...);
- ``/healthz``: 200 while the process runs;
- ``/readyz``: 200 when the worker has started (so its model is loaded) and every
  readiness check passes (broker reachable, store reachable), else 503. The body
  is JSON with the result of each check.

Labels carry service, topic, partition, model and outcome names only, never a
patient or procedure identifier.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Info, generate_latest

from crc_medai.settings import Settings
from schemas.messages import utc_now

logger = logging.getLogger(__name__)

#: Histogram buckets in seconds, dense between 5 ms and 2 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)

#: Seconds a readiness check result is reused, so frequent probes do not load the broker or store.
READINESS_CACHE_S = 2.0

#: Seconds a readiness check may take to connect before it counts as failed.
CHECK_TIMEOUT_S = 1.0

INFERENCE_SECONDS = Histogram(
    "crc_inference_duration_seconds",
    "Model inference time per frame or record (seconds), explanation excluded for detection.",
    ["service", "model"],
    buckets=LATENCY_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "crc_end_to_end_latency_seconds",
    "Time from the source timestamp of the input (a frame's capture time, a record's or result's "
    "source_ts) to the publication of the output (seconds).",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
HEATMAP_SECONDS = Histogram(
    "crc_heatmap_duration_seconds",
    "Time to compute a flagged frame's Grad-CAM overlay and store it in MinIO (seconds).",
    buckets=LATENCY_BUCKETS,
)
RECORDS_PROCESSED = Counter(
    "crc_records_processed",
    "Records an agent handled without error.",
    ["service", "topic"],
)
RECORDS_DEAD_LETTERED = Counter(
    "crc_records_dead_lettered",
    "Records an agent could not handle and sent to its dead-letter topic.",
    ["service", "topic"],
)
FRAMES_PROCESSED = Counter("crc_frames_processed", "Video frames the detection processor ran the model on.")
FRAMES_FLAGGED = Counter("crc_frames_flagged", "Video frames whose polyp probability reached the threshold.")
FRAMES_SKIPPED = Counter(
    "crc_frames_skipped",
    "Video frames not run through the model, by reason (rejected: sent to the dead-letter topic).",
    ["reason"],
)
#: Outcomes of ``crc_heatmaps_total``: a heatmap computed, or a flagged frame left without one.
HEATMAP_OUTCOMES = ("computed", "rate_limited", "unconfirmed")
HEATMAPS = Counter(
    "crc_heatmaps",
    "Grad-CAM heatmaps of flagged frames by outcome (computed; rate_limited: over the per-procedure rate; "
    "unconfirmed: the frame belongs to no finding yet).",
    ["outcome"],
)
FHIR_DELIVERIES = Counter(
    "crc_fhir_deliveries",
    "FHIR resource deliveries by outcome (succeeded, failed).",
    ["outcome"],
)
FHIR_SERVER_DELIVERIES = Counter(
    "crc_fhir_server_deliveries",
    "Resources the fhir-delivery worker sent to the FHIR server, by outcome (succeeded; failed: dead-lettered).",
    ["outcome"],
)
FHIR_SERVER_REQUESTS = Counter(
    "crc_fhir_server_requests",
    "Transaction Bundle requests to the FHIR server, retries included, by outcome (succeeded, failed).",
    ["outcome"],
)
CONSUMER_LAG = Gauge(
    "crc_consumer_lag_messages",
    "Messages between the partition's high watermark and the consumer group's committed offset.",
    ["service", "topic", "partition"],
)
MODEL_INFO = Info("crc_model", "Name and version of the model a service loaded.", ["service"])
SERVICE_READY = Gauge("crc_service_ready", "1 when /readyz returns 200, else 0.", ["service"])

#: Dead-letter counters that also count in a service's own unit of work.
_DEAD_LETTER_UNITS: dict[str, Callable[[], None]] = {
    "detection": lambda: FRAMES_SKIPPED.labels(reason="rejected").inc(),
    "fhir-consumer": lambda: FHIR_DELIVERIES.labels(outcome="failed").inc(),
}

ReadinessCheck = Callable[[], str]
"""A check that returns a short detail when the dependency is usable and raises when it is not."""


class Health:
    """Liveness and readiness of this process's service."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.started = False
        self.checks: dict[str, ReadinessCheck] = {}
        self._cache: tuple[float, bool, dict[str, str]] | None = None
        self._lock = threading.Lock()

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        """Add a readiness check; ``check`` raises when the dependency is unusable."""
        self.checks[name] = check

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Run the checks, reusing results for :data:`READINESS_CACHE_S`, and return (ready, detail per check)."""
        with self._lock:
            now = time.monotonic()
            if self._cache is not None and now - self._cache[0] < READINESS_CACHE_S:
                return self._cache[1], dict(self._cache[2])

            details = {"worker": "started" if self.started else "not started"}
            ready = self.started
            for name, check in self.checks.items():
                try:
                    details[name] = check()
                except Exception as exc:  # noqa: BLE001 - any failure means not ready; the reason is reported
                    ready = False
                    details[name] = f"failed: {exc}"
            self._cache = (now, ready, details)
            return ready, dict(details)


_health: Health | None = None


def health(service: str) -> Health:
    """Return this process's :class:`Health`, created on first use for ``service``."""
    global _health
    if _health is None:
        _health = Health(service)
        SERVICE_READY.labels(service=service).set_function(lambda: float(_health.readiness()[0]))
    return _health


def metrics_port(settings: Settings) -> int:
    """Return the metrics port (``CRC_METRICS_PORT``); 0 means off."""
    return settings.metrics_port


def metrics_host(settings: Settings) -> str:
    """Return the address the metrics server binds (``CRC_METRICS_HOST``, loopback by default)."""
    return settings.metrics_host


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        elif path == "/healthz":
            self._reply_json(200, {"service": self.health.service, "status": "alive"})
        elif path == "/readyz":
            ready, details = self.health.readiness()
            body = {"service": self.health.service, "status": "ready" if ready else "not ready", "checks": details}
            self._reply_json(200 if ready else 503, body)
        else:
            self._reply_json(404, {"error": f"no endpoint {path}; use /metrics, /healthz or /readyz"})

    def _reply_json(self, status: int, body: dict[str, object]) -> None:
        self._reply(status, "application/json", json.dumps(body).encode())

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by http.server
        logger.debug("metrics request " + format, *args)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz from a daemon thread."""

    def __init__(self, host: str, port: int, service_health: Health) -> None:
        handler = type("Handler", (_Handler,), {"health": service_health})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """Host and port the server listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(settings: Settings, service: str) -> MetricsServer | None:
    """Start the metrics server of ``service`` on the configured port; return None when the port is 0."""
    port = metrics_port(settings)
    if port == 0:
        logger.info("metrics server off service=%s (set CRC_METRICS_PORT to serve /metrics)", service)
        return None

    service_health = health(service)
    service_health.add_check("broker", lambda: check_reachable(settings.kafka_bootstrap_servers, "Kafka"))
    server = MetricsServer(metrics_host(settings), port, service_health).start()
    host, bound_port = server.address
    logger.info("metrics server started service=%s host=%s port=%d", service, host, bound_port)
    return server


def check_reachable(addresses: str, name: str) -> str:
    """Open a TCP connection to the first reachable ``host:port`` of ``addresses`` (comma-separated).

    Raises:
        ConnectionError: when none accepts a connection within :data:`CHECK_TIMEOUT_S`.
    """
    errors = []
    for address in addresses.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=CHECK_TIMEOUT_S):
                return f"ok {host}:{port}"
        except OSError as exc:
            errors.append(f"{address}: {exc}")
    raise ConnectionError(f"{name} not reachable ({'; '.join(errors)}); check that it runs and the address setting")


def check_writable(folder: Path) -> str:
    """Check that ``folder`` (or the nearest existing folder above it) is writable by this process."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"{existing} is not writable by this process; fix its permissions or the setting")
    return f"ok {folder}"


def record_model(service: str, name: str, version: str) -> None:
    """Publish the loaded model's name and version as ``crc_model_info``."""
    MODEL_INFO.labels(service=service).info({"model": name, "version": version})


def declare_topics(service: str, topics: tuple[str, ...]) -> None:
    """Create the per-topic counters at 0, so queries see them before the first record."""
    for topic in topics:
        RECORDS_PROCESSED.labels(service=service, topic=topic)
        RECORDS_DEAD_LETTERED.labels(service=service, topic=topic)
    if service == "detection":
        FRAMES_SKIPPED.labels(reason="rejected")
    if service == "fhir-consumer":
        for outcome in ("succeeded", "failed"):
            FHIR_DELIVERIES.labels(outcome=outcome)


def record_processed(service: str, topic: str) -> None:
    """Count one record handled without error."""
    RECORDS_PROCESSED.labels(service=service, topic=topic).inc()


def record_dead_letter(service: str, topic: str) -> None:
    """Count one dead-lettered record; for detection also a skipped frame, for the FHIR consumer a failed delivery."""
    RECORDS_DEAD_LETTERED.labels(service=service, topic=topic).inc()
    unit = _DEAD_LETTER_UNITS.get(service)
    if unit is not None:
        unit()


def record_frame_skipped(reason: str) -> None:
    """Count one frame skipped for ``reason``, a short fixed word such as ``stale``."""
    FRAMES_SKIPPED.labels(reason=reason).inc()


def record_heatmap(outcome: str) -> None:
    """Count one flagged frame's heatmap by ``outcome``: ``computed``, ``rate_limited`` or ``unconfirmed``."""
    HEATMAPS.labels(outcome=outcome).inc()


def observe_end_to_end(service: str, since: datetime) -> None:
    """Observe the time from ``since`` (an aware source timestamp) to now."""
    END_TO_END_SECONDS.labels(service=service).observe(max((utc_now() - since).total_seconds(), 0.0))


def observe_detection(service: str, model: str, inference_ms: float, flagged: bool, captured_at: datetime) -> None:
    """Record one frame's detection: inference time, end-to-end latency, processed and flagged counts."""
    INFERENCE_SECONDS.labels(service=service, model=model).observe(inference_ms / 1000.0)
    observe_end_to_end(service, captured_at)
    FRAMES_PROCESSED.inc()
    if flagged:
        FRAMES_FLAGGED.inc()


def observe_prognosis(service: str, model: str, inference_ms: float, record_ts: datetime) -> None:
    """Record one record's prognosis: scoring time and time since the record's source_ts."""
    INFERENCE_SECONDS.labels(service=service, model=model).observe(inference_ms / 1000.0)
    observe_end_to_end(service, record_ts)


def record_fhir_delivery(service: str, result_ts: datetime) -> None:
    """Count one delivered FHIR resource and observe the time since its result's source_ts."""
    FHIR_DELIVERIES.labels(outcome="succeeded").inc()
    observe_end_to_end(service, result_ts)


def declare_fhir_server_outcomes() -> None:
    """Create the FHIR server delivery counters at 0, so queries see them before the first request."""
    for outcome in ("succeeded", "failed"):
        FHIR_SERVER_DELIVERIES.labels(outcome=outcome)
        FHIR_SERVER_REQUESTS.labels(outcome=outcome)


def record_fhir_server_request(outcome: str) -> None:
    """Count one transaction Bundle request to the FHIR server (``succeeded`` or ``failed``)."""
    FHIR_SERVER_REQUESTS.labels(outcome=outcome).inc()


def record_fhir_server_delivery(outcome: str, resources: int) -> None:
    """Count resources delivered to the FHIR server (``succeeded``) or dead-lettered (``failed``)."""
    FHIR_SERVER_DELIVERIES.labels(outcome=outcome).inc(resources)
