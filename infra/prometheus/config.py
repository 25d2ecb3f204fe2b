"""Render a Prometheus configuration that scrapes the CRC-MedAI services.

``prometheus.yml`` beside this module is the rendering for the compose stack;
tests render their own with the ports they picked. JSON is valid YAML, so the
configuration is written with :mod:`json` and needs no YAML library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

PROMETHEUS_DIR = Path(__file__).resolve().parent
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"

#: Job name of the service targets; alert rules select ``up{job="crc-medai"}``.
JOB_NAME = "crc-medai"


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
    # Prometheus durations take no decimals, so a fractional interval is written in milliseconds.
    interval = (
        f"{int(scrape_interval_s)}s"
        if scrape_interval_s == int(scrape_interval_s)
        else f"{int(scrape_interval_s * 1000)}ms"
    )
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB_NAME,
                "metrics_path": "/metrics",
                # Metrics that carry their own service label keep it, and the target's label fills in the others.
                "honor_labels": True,
                "static_configs": [
                    {"targets": [address], "labels": {"service": service}} for service, address in targets.items()
                ],
            }
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def main() -> None:
    """Print the configuration of the compose stack, where every service serves metrics on port 9400."""
    targets = {service: f"{service}:9400" for service in ("detection", "prognosis", "fhir-consumer")}
    # Prometheus resolves a relative rule file against the folder of the configuration file.
    print(render_config(targets, rule_files=[Path(ALERT_RULES.name)]), end="")


if __name__ == "__main__":
    main()
