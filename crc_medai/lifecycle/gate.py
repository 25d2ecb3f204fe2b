"""The evaluation gate: a candidate may replace the champion only if no gated metric drops beyond the tolerance.

Both models are compared on the same held-out set: the gate checks that the
two evaluation reports name the same held-out identity (SHA-256) before it
compares a single figure. A drop is the champion's value minus the
candidate's for a higher-is-better metric, and the reverse for a
lower-is-better one. The candidate passes when every drop is at most the
tolerance (``model_gate_tolerance``, absolute, in the metric's own unit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from crc_medai.lifecycle.errors import GateRejectedError
from crc_medai.lifecycle.kinds import Evaluation, ModelKind


@dataclass(frozen=True)
class MetricCheck:
    """One gated metric: both values, the drop, and whether it is within the tolerance."""

    metric: str
    higher_is_better: bool
    champion: float
    candidate: float
    drop: float
    passed: bool


@dataclass(frozen=True)
class GateDecision:
    """The outcome of one gate, with every figure behind it."""

    kind: str
    registered_name: str
    candidate_version: str
    champion_version: str | None
    tolerance: float
    holdout_sha256: str
    passed: bool
    reason: str
    checks: list[MetricCheck] = field(default_factory=list)
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_dict(self) -> dict[str, object]:
        """Return the decision as JSON-ready data."""
        return asdict(self)

    def failed_metrics(self) -> list[str]:
        """Return the names of the metrics that dropped beyond the tolerance."""
        return [check.metric for check in self.checks if not check.passed]


def decide(
    kind: ModelKind,
    candidate_version: str,
    candidate: Evaluation,
    champion_version: str | None,
    champion: Evaluation | None,
    tolerance: float,
) -> GateDecision:
    """Compare a candidate's evaluation with the champion's, metric by metric.

    Raises:
        GateRejectedError: the two evaluations were made on different held-out
            sets, or one lacks a gated metric; nothing can be compared.
    """
    common = {
        "kind": kind.name,
        "registered_name": kind.registered_name,
        "candidate_version": candidate_version,
        "tolerance": tolerance,
        "holdout_sha256": candidate.holdout.sha256,
    }
    if champion is None or champion_version is None:
        return GateDecision(**common, champion_version=None, passed=True, reason="no champion yet")
    if champion.holdout.sha256 != candidate.holdout.sha256:
        raise GateRejectedError(
            f"{kind.registered_name} version {candidate_version} was evaluated on held-out set "
            f"{candidate.holdout.sha256[:12]} but champion version {champion_version} on "
            f"{champion.holdout.sha256[:12]}; re-evaluate both with the same gate settings"
        )

    checks = [_check(rule.name, rule.higher_is_better, champion, candidate, tolerance) for rule in kind.metrics]
    failed = [check.metric for check in checks if not check.passed]
    reason = (
        f"every metric within {tolerance:g} of champion version {champion_version}"
        if not failed
        else f"{', '.join(failed)} dropped more than {tolerance:g} below champion version {champion_version}"
    )
    return GateDecision(**common, champion_version=champion_version, passed=not failed, reason=reason, checks=checks)


def _check(
    metric: str, higher_is_better: bool, champion: Evaluation, candidate: Evaluation, tolerance: float
) -> MetricCheck:
    missing = [
        name for name, report in (("champion", champion), ("candidate", candidate)) if metric not in report.metrics
    ]
    if missing:
        raise GateRejectedError(
            f"metric {metric!r} is missing from the {' and '.join(missing)} evaluation report; "
            "re-evaluate the version with the current code"
        )
    champion_value, candidate_value = champion.metrics[metric], candidate.metrics[metric]
    drop = champion_value - candidate_value if higher_is_better else candidate_value - champion_value
    return MetricCheck(
        metric=metric,
        higher_is_better=higher_is_better,
        champion=champion_value,
        candidate=candidate_value,
        drop=drop,
        passed=drop <= tolerance,
    )
