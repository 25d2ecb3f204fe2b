"""The DiagnosticReport of a procedure, which groups the procedure's polyp findings.

The report is re-emitted with the same id each time one of its findings opens
or closes, so its latest version lists every finding so far. The findings of
each procedure are kept in Redis (:class:`ProcedureFindings`), so the list
survives a restart of the FHIR consumer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from consumers.resources import (
    AI_ASSERTED,
    heatmap_media,
    narrative,
    patient_reference,
    resource_id,
    validate,
)
from crc_medai.settings import Settings
from schemas.messages import PolypFinding

logger = logging.getLogger(__name__)

LOINC = "http://loinc.org"
DIAGNOSTIC_REPORT_IDENTIFIER_SYSTEM = "urn:crc-medai:diagnostic-report"
#: Seconds a procedure's findings stay in Redis after its last finding event. A replay of the findings
#: topic rebuilds a list that has expired.
FINDINGS_TTL_S = 30 * 24 * 3600


@dataclass(frozen=True)
class ReportedFinding:
    """One finding as the DiagnosticReport lists it: its Observation, its heatmap Media and its times."""

    finding_id: str
    observation_id: str
    status: str
    first_seen: str
    last_seen: str
    issued: str
    media_id: str | None = None
    media_title: str | None = None
    patient_id: str | None = None
    stale_frames_skipped: int | None = None

    @classmethod
    def from_finding(cls, finding: PolypFinding) -> ReportedFinding:
        """Summarise a finding; the ids are those of the resources built from it."""
        media = heatmap_media(finding)
        return cls(
            finding_id=str(finding.finding_id),
            observation_id=resource_id("finding", finding.finding_id),
            status=finding.status,
            first_seen=finding.first_seen.isoformat(),
            last_seen=finding.last_seen.isoformat(),
            issued=finding.source_ts.isoformat(),
            media_id=media["id"] if media else None,
            media_title=media["content"]["title"] if media else None,
            patient_id=finding.patient_id,
            stale_frames_skipped=finding.stale_frames_skipped,
        )

    def to_json(self) -> str:
        """Serialise for a Redis hash field."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ReportedFinding:
        """Read what :meth:`to_json` wrote."""
        return cls(**json.loads(text))


def diagnostic_report(procedure_id: str, findings: Sequence[ReportedFinding]) -> dict[str, Any]:
    """Build the DiagnosticReport of a procedure from its findings so far.

    The status is ``partial`` while a finding is still open (the polyp is in
    view) and ``preliminary`` once all are closed, because no clinician has
    reviewed the AI output.

    ``subject`` names the patient when the frames of the procedure named one.
    The conclusion states how many frames the detector skipped as stale when a
    finding event counted any, and omits that sentence otherwise.
    """
    if not findings:
        raise ValueError(f"procedure {procedure_id} has no findings; a DiagnosticReport needs at least one")
    ordered = sorted(findings, key=lambda item: (_instant(item.first_seen), item.finding_id))
    still_open = sum(item.status == "open" for item in ordered)
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": resource_id("diagnostic-report", procedure_id),
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": DIAGNOSTIC_REPORT_IDENTIFIER_SYSTEM, "value": procedure_id}],
        "status": "partial" if still_open else "preliminary",
        "code": {
            "coding": [{"system": LOINC, "code": "18746-8", "display": "Colonoscopy study"}],
            "text": f"Colonoscopy {procedure_id}: polyps detected by AI",
        },
        "effectivePeriod": {
            "start": min(ordered, key=lambda item: _instant(item.first_seen)).first_seen,
            "end": max(ordered, key=lambda item: _instant(item.last_seen)).last_seen,
        },
        "issued": max(ordered, key=lambda item: _instant(item.issued)).issued,
        "result": [{"reference": f"Observation/{item.observation_id}"} for item in ordered],
        "conclusion": (
            f"{len(ordered)} polyp finding(s) flagged by the AI polyp detector, {still_open} still in view. "
            f"{_stale_sentence(ordered)}Not reviewed by a clinician."
        ),
    }
    patients = {item.patient_id for item in ordered if item.patient_id}
    if len(patients) == 1:
        resource["subject"] = patient_reference(patients.pop())
    media = [
        {"comment": item.media_title, "link": {"reference": f"Media/{item.media_id}"}}
        for item in ordered
        if item.media_id
    ]
    if media:
        resource["media"] = media
    resource["text"] = narrative([resource["code"]["text"], resource["conclusion"]])
    return validate(resource)


def _stale_sentence(findings: Sequence[ReportedFinding]) -> str:
    """Return a sentence on frames skipped as stale, or an empty string when no finding event counted any."""
    # The counts are cumulative per procedure, so the largest is the latest known.
    skipped = max((item.stale_frames_skipped or 0 for item in findings), default=0)
    if skipped == 0:
        return ""
    return (
        f"At least {skipped} frame(s) of the procedure arrived later than the detector's latency budget and "
        "were skipped without being examined, so polyps in them may be missing from this report. "
    )


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


class ProcedureFindings:
    """The findings of each procedure, one Redis hash per procedure keyed by finding id."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def key(self, procedure_id: str) -> str:
        """Return the Redis key of a procedure's findings."""
        return self.settings.redis_key(f"fhir-consumer:procedure:{procedure_id}:findings")

    async def add(self, finding: PolypFinding) -> list[ReportedFinding]:
        """Store a finding and return every finding of its procedure so far.

        A finding that is already closed stays closed when its ``open`` event
        arrives again, as it does when a consumer re-reads records after a
        restart.
        """
        key = self.key(finding.procedure_id)
        field = str(finding.finding_id)
        stored = await self.redis.hget(key, field)
        if stored is not None and finding.status == "open" and ReportedFinding.from_json(stored).status == "closed":
            logger.debug("finding already closed, open event ignored procedure=%s", finding.procedure_id)
        else:
            await self.redis.hset(key, field, ReportedFinding.from_finding(finding).to_json())
        await self.redis.expire(key, FINDINGS_TTL_S)
        values = await self.redis.hvals(key)
        return [ReportedFinding.from_json(value) for value in values]
