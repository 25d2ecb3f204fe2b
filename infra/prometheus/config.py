"""Render a Prometheus configuration that scrapes the CRC-MedAI services.

``prometheus.yml`` beside this module is the rendering for the compose stack
(:func:`render_compose_config`), which finds every replica of a service through
DNS. Tests render their own with the loopback ports they picked
(:func:`render_config`). JSON is valid YAML, so the configuration is written
with :mod:`json` and needs no YAML library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

PROMETHEUS_DIR = Path(__file__).resolve().parent
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"

#: Job name of the service targets; alert rules select ``up{job="crc-medai"}``.
JOB_NAME = "crc-medai"

#: Compose services that serve metrics, and the port every one of them serves on (``CRC_METRICS_PORT`` in compose).
COMPOSE_SERVICES = (
    "detection",
    "prognosis",
    "fhir-consumer",
    "record-intake",
    "fhir-view",
    "fhir-delivery",
    "hl7-listener",
)
COMPOSE_METRICS_PORT = 9400

#: Seconds between DNS look-ups of the compose service names, so scaled replicas are found.
DNS_REFRESH_S = 30


def render_config(
    targets: Mapping[str, str],
    *,
    rule_files: Sequence[Path] = (ALERT_RULES,),
    scrape_interval_s: float = 15.0,
) -> str:
    """Return a prometheus.yml scraping ``targets``.

    Args:
        targets: service name -> ``host:port`` of its metrics server. Each target
            gets a ``service`` label with the name, so process metrics are distinguishable by service.
        rule_files: alert and recording rule files to load.
        scrape_interval_s: seconds between scrapes, also used as the rule evaluation interval.
    """
    job = _scrape_job()
    job["static_configs"] = [
        {"targets": [address], "labels": {"service": service}} for service, address in targets.items()
    ]
    return _dump(job, rule_files, scrape_interval_s)


def render_compose_config(
    services: Sequence[str] = COMPOSE_SERVICES,
    *,
    port: int = COMPOSE_METRICS_PORT,
    rule_files: Sequence[Path] = (Path(ALERT_RULES.name),),
    scrape_interval_s: float = 15.0,
) -> str:
    """Return the prometheus.yml of the compose stack, scraping every replica of ``services`` on ``port``.

    Compose's DNS resolves a service name to the address of every replica, so
    ``docker compose up --scale detection=2`` gives two targets. Each target's
    ``service`` label is the name that found it.
    """
    job = _scrape_job()
    job["dns_sd_configs"] = [
        {"names": list(services), "type": "A", "port": port, "refresh_interval": f"{DNS_REFRESH_S}s"}
    ]
    job["relabel_configs"] = [{"source_labels": ["__meta_dns_name"], "target_label": "service"}]
    return _dump(job, rule_files, scrape_interval_s)


def _scrape_job() -> dict[str, object]:
    return {
        "job_name": JOB_NAME,
        "metrics_path": "/metrics",
        # Metrics that carry their own service label keep it, and the target's label fills in the others.
        "honor_labels": True,
    }


def _dump(job: dict[str, object], rule_files: Sequence[Path], scrape_interval_s: float) -> str:
    # Prometheus durations take no decimals, so a fractional interval is written in milliseconds.
    interval = (
        f"{int(scrape_interval_s)}s"
        if scrape_interval_s == int(scrape_interval_s)
        else f"{int(scrape_interval_s * 1000)}ms"
    )
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [job],
    }
    return json.dumps(config, indent=2) + "\n"


def main() -> None:
    """Print the configuration of the compose stack (written to prometheus.yml beside this module)."""
    # Prometheus resolves a relative rule file against the folder of the configuration file.
    print(render_compose_config(), end="")


if __name__ == "__main__":
    main()
