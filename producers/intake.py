"""Record intake: one FHIR R4 input in, one PatientRecord per patient out on ``patient-records``.

Every input path uses :class:`RecordIntake`: record files (``crc-medai
produce-records``), the HTTP gateway and the ``ehr-inbound`` Kafka worker, and
the HL7 v2 converter once it has built a Bundle.

For each patient the intake keeps the current version of every resource in a
Redis hash, so that a single resource or a partial Bundle adds to what was
received before. A resource replaces the stored one with the same ``Type/id``
unless the stored one has a later ``meta.lastUpdated`` (or Bundle
``meta.lastUpdated``/``timestamp``), so a late, older version does not
overwrite a newer one. Without a timestamp the later arrival wins.

The published record is a ``collection`` Bundle of all of the patient's
current resources. Its ``source_ts`` is their latest timestamp, or the time
received when none has one. Its ``event_id`` is derived from its content, so
the same content is published under the same event id and scored once.

A record whose serialised form exceeds the Kafka limit
(``CRC_KAFKA_MAX_MESSAGE_BYTES``) is rejected before anything is stored. A
rejected input is written to ``dlq.<service>`` with the error and its origin in
the headers, and :class:`RecordRejected` is raised. The dead-letter value is
the input unchanged, or its first bytes when the input itself exceeds the limit.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from crc_medai.kafka import dead_letter_headers, fit_dead_letter, max_value_bytes
from crc_medai.logs import pseudonym
from crc_medai.settings import Settings
from processors.prognosis.errors import InvalidBundleError
from processors.prognosis.fhir_mapping import MappedRecord, features_from_bundle
from producers.fhir_input import (
    IncomingResource,
    PatientResources,
    RecordRejected,
    dump_fhir_json,
    full_url_for,
    group_by_patient,
    incoming_resources,
    read_fhir_json,
    read_ndjson,
)
from schemas.messages import PatientRecord, utc_now

__all__ = [
    "AcceptedRecord",
    "NdjsonOutcome",
    "RecordIntake",
    "RecordOrigin",
    "RecordRejected",
    "RecordTooLarge",
    "check_input",
]

logger = logging.getLogger(__name__)

#: Namespace of the content-derived event ids of published records.
EVENT_ID_NAMESPACE = uuid.UUID("3c1f5e0a-7d2b-4b8e-a6f4-9e0d2c8b1a55")
#: Expiry of the per-patient Redis lock in seconds (``SET NX PX``), the longest a crashed intake can block a patient.
#: NOTE: a merge and publish that takes longer loses the lock. A second intake for the same patient may then run
#: at the same time, and releasing the lock raises redis-py's ``LockNotOwnedError``.
PATIENT_LOCK_TIMEOUT_S = 30.0


class RecordTooLarge(RecordRejected):
    """The patient record built from an input exceeds the Kafka message size limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            None,
            f"the patient record built from this input has {size} bytes, more than the Kafka limit of {limit} "
            "bytes (CRC_KAFKA_MAX_MESSAGE_BYTES); the record contains all of the patient's current resources, so "
            "split the Bundle into smaller ones or send NDJSON, and link large attachments by URL instead of "
            "embedding them",
        )
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class AcceptedRecord:
    """A published record: the patient, the message and the features that could not be mapped (with the reason)."""

    patient_id: str
    record: PatientRecord
    missing: dict[str, str]
    #: ``Type/id`` of incoming resources that were older than the stored version and so were not applied.
    stale: list[str] = field(default_factory=list)
    #: True when the input changed none of the stored resources, so the record equals the one published before.
    unchanged: bool = False


@dataclass(frozen=True)
class RecordOrigin:
    """Origin of a Kafka input record (topic, partition, offset), for the dead-letter headers."""

    topic: str
    partition: int
    offset: int


@dataclass
class NdjsonOutcome:
    """The patients accepted from an NDJSON input and the parts rejected."""

    accepted: list[AcceptedRecord] = field(default_factory=list)
    rejected: list[RecordRejected] = field(default_factory=list)


@dataclass(frozen=True)
class _StoredResource:
    resource: dict[str, Any]
    updated: datetime | None


class RecordIntake:
    """Intake of FHIR R4 input: validates it, merges it with each patient's stored resources and publishes the records.

    The producer must be started by the caller. Redis is opened from
    ``settings.redis_url`` unless a client is given; :meth:`close` closes it.
    """

    def __init__(
        self, settings: Settings, producer: AIOKafkaProducer, *, service: str, redis: Redis | None = None
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.service = service
        self.redis = redis if redis is not None else Redis.from_url(settings.redis_url)
        self._owns_redis = redis is None
        self.records_topic = settings.topic(PatientRecord.topic)
        self.dead_letter_topic = settings.topic(f"dlq.{service}")

    async def close(self) -> None:
        """Close the Redis client if the intake opened it."""
        if self._owns_redis:
            await self.redis.aclose()

    async def accept(
        self,
        data: dict[str, Any],
        *,
        source_name: str,
        raw: bytes | None = None,
        origin: RecordOrigin | None = None,
    ) -> AcceptedRecord:
        """Accept one FHIR R4 resource or Bundle for one patient and publish the patient's record.

        ``raw`` is the input as received, written to the dead-letter topic on
        rejection (``data`` re-encoded when absent).

        Raises:
            RecordRejected: the input is invalid, covers several patients, or
                cannot be mapped; the dead-letter record has been written.
        """
        raw = raw if raw is not None else dump_fhir_json(data).encode("utf-8")
        try:
            # A copy, because ids are assigned and references rewritten in place.
            groups = group_by_patient(incoming_resources(copy.deepcopy(data)))
            if len(groups) != 1:
                raise RecordRejected(
                    None,
                    f"the input covers {len(groups)} patients; send one patient per Bundle, or several as NDJSON",
                )
            (group,) = groups.values()
            return await self._merge_and_publish(group, source_name)
        except RecordRejected as error:
            await self.dead_letter(raw, error, source_name=source_name, origin=origin)
            raise

    async def accept_bytes(self, raw: bytes, *, source_name: str, origin: RecordOrigin | None = None) -> AcceptedRecord:
        """Parse FHIR JSON text (byte-order mark allowed) and :meth:`accept` it."""
        try:
            data = read_fhir_json(raw)
        except RecordRejected as error:
            await self.dead_letter(raw, error, source_name=source_name, origin=origin)
            raise
        return await self.accept(data, source_name=source_name, raw=raw, origin=origin)

    async def accept_ndjson(self, raw: bytes, *, source_name: str, origin: RecordOrigin | None = None) -> NdjsonOutcome:
        """Accept an NDJSON bulk-export text: one resource per line, grouped by patient.

        An invalid line is rejected on its own. A patient whose resources
        fail is rejected as a whole, and the other patients are still
        published. Each rejected part gets its own dead-letter record.
        """
        outcome = NdjsonOutcome()
        lines: list[tuple[int, bytes, IncomingResource]] = []
        raw_lines = raw.split(b"\n")
        for number, parsed in read_ndjson(raw):
            line_raw = raw_lines[number - 1].rstrip(b"\r")
            try:
                if isinstance(parsed, RecordRejected):
                    raise parsed
                (item,) = _relocate(_line_resources(parsed, number), f"line {number}")
                lines.append((number, line_raw, item))
            except RecordRejected as error:
                await self.dead_letter(line_raw, error, source_name=f"{source_name}:{number}", origin=origin)
                outcome.rejected.append(error)

        try:
            groups = group_by_patient([item for _, _, item in lines])
        except RecordRejected as error:
            await self.dead_letter(raw, error, source_name=source_name, origin=origin)
            outcome.rejected.append(error)
            return outcome
        for group in groups.values():
            group_raw = b"\n".join(line for _, line, item in lines if item in group.resources)
            try:
                outcome.accepted.append(await self._merge_and_publish(group, source_name))
            except RecordRejected as error:
                await self.dead_letter(group_raw, error, source_name=source_name, origin=origin)
                outcome.rejected.append(error)
        return outcome

    async def dead_letter(
        self, raw: bytes, error: BaseException, *, source_name: str, origin: RecordOrigin | None = None
    ) -> None:
        """Write a rejected input unchanged to ``dlq.<service>`` with the error and its origin."""
        logger.warning("record rejected service=%s source=%s error=%s", self.service, source_name, error)
        headers = dead_letter_headers(
            service=self.service,
            error=error,
            source=source_name,
            topic=origin.topic if origin else None,
            partition=origin.partition if origin else None,
            offset=origin.offset if origin else None,
        )
        value, headers = fit_dead_letter(raw, headers, max_value_bytes(self.settings))
        await self.producer.send_and_wait(self.dead_letter_topic, value=value, headers=headers)

    # Merging and publishing

    async def _merge_and_publish(self, group: PatientResources, source_name: str) -> AcceptedRecord:
        patient_id = group.patient_id
        key = self.settings.redis_key(f"record-intake:patient:{patient_id}")
        async with self.redis.lock(
            self.settings.redis_key(f"record-intake:lock:{patient_id}"), timeout=PATIENT_LOCK_TIMEOUT_S
        ):
            stored = await self._load(key)
            merged, changed, stale = _merge(stored, group.resources)
            bundle = _record_bundle(patient_id, merged)
            mapped = _map(bundle, merged, group)

            source_ts = max((item.updated for item in merged.values() if item.updated), default=None) or utc_now()
            record = PatientRecord(
                event_id=uuid.uuid5(EVENT_ID_NAMESPACE, dump_fhir_json(bundle)),
                source_ts=source_ts,
                patient_id=patient_id,
                source_name=source_name,
                bundle=bundle,
                missing=mapped.missing,
            )
            value = encode_record(record)
            if len(value) > max_value_bytes(self.settings):
                raise RecordTooLarge(len(value), max_value_bytes(self.settings))
            # Stored before publishing, so that a failed send leaves the resources for the next record.
            # NOTE: an unchanged record is still published: its event_id is the same, so prognosis scores it once,
            # and a send that failed after the store above is repaired by sending the same input again.
            if changed:
                await self.redis.hset(key, mapping={name: _encode_stored(merged[name]) for name in changed})
            await self.producer.send_and_wait(self.records_topic, value=value, key=patient_id.encode("utf-8"))

        logger.info(
            "record published patient=%s source=%s resources=%d changed=%d stale=%d missing=%s",
            pseudonym(patient_id),
            source_name,
            len(merged),
            len(changed),
            len(stale),
            ",".join(sorted(mapped.missing)),
        )
        return AcceptedRecord(
            patient_id=patient_id, record=record, missing=mapped.missing, stale=stale, unchanged=not changed
        )

    async def _load(self, key: str) -> dict[str, _StoredResource]:
        values = await self.redis.hgetall(key)
        return {name.decode("utf-8"): _decode_stored(value) for name, value in values.items()}


def check_input(data: Any) -> dict[str, MappedRecord]:
    """Validate and map one input on its own, without stored resources, Redis or Kafka.

    Returns the mapped record of each patient in the input. This is the
    verdict :meth:`RecordIntake.accept` reaches for an input that contains each
    patient's Patient, and the verdict the conformance tests compare with the
    HAPI FHIR validator's.

    Raises:
        RecordRejected: names the element that failed.
    """
    mapped: dict[str, MappedRecord] = {}
    for patient_id, group in group_by_patient(incoming_resources(copy.deepcopy(data))).items():
        merged, _, _ = _merge({}, group.resources)
        mapped[patient_id] = _map(_record_bundle(patient_id, merged), merged, group)
    return mapped


def encode_record(record: PatientRecord) -> bytes:
    """Serialise a PatientRecord like ``to_bytes``, but with the Bundle's decimals written as received."""
    envelope = json.loads(record.model_dump_json(exclude={"bundle"}))
    envelope["bundle"] = record.bundle
    return dump_fhir_json(envelope).encode("utf-8")


def _line_resources(data: Any, number: int) -> list[IncomingResource]:
    try:
        return incoming_resources(data)
    except RecordRejected as error:
        element = f"line {number}: {error.element}" if error.element else f"line {number}"
        raise RecordRejected(element, error.reason) from error


def _relocate(items: list[IncomingResource], location: str) -> list[IncomingResource]:
    """Name NDJSON resources by their line, because the element paths start at the resource."""
    if len(items) != 1 or items[0].resource["resourceType"] == "Bundle":
        raise RecordRejected(location, "an NDJSON line must contain one resource, not a Bundle")
    item = items[0]
    return [IncomingResource(f"{location}: {item.location}", item.resource, item.full_url, item.updated)]


def _merge(
    stored: dict[str, _StoredResource], incoming: list[IncomingResource]
) -> tuple[dict[str, _StoredResource], list[str], list[str]]:
    """Apply incoming resources over the stored ones; return the result, the keys changed and the stale keys.

    A resource equal to the stored one, with the same timestamp, is neither changed nor stale.
    """
    merged = dict(stored)
    changed: list[str] = []
    stale: list[str] = []
    for item in incoming:
        current = merged.get(item.key)
        if current is not None and current.updated and item.updated and item.updated < current.updated:
            stale.append(item.key)
            continue
        if current is not None and _same_version(current, item):
            continue
        merged[item.key] = _StoredResource(item.resource, item.updated)
        changed.append(item.key)
    return merged, changed, stale


def _same_version(current: _StoredResource, item: IncomingResource) -> bool:
    # Compared as FHIR JSON text, because Decimal("5.0") == Decimal("5.000") would hide a change of precision.
    return current.updated == item.updated and dump_fhir_json(current.resource) == dump_fhir_json(item.resource)


def _record_bundle(patient_id: str, resources: Mapping[str, _StoredResource]) -> dict[str, Any]:
    """Build the collection Bundle of a patient's current resources, the Patient first."""
    ordered = sorted(resources.items(), key=lambda item: (item[1].resource["resourceType"] != "Patient", item[0]))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": f"{patient_id}-record", "type": "collection"}
    updated = max((item.updated for item in resources.values() if item.updated), default=None)
    if updated is not None:
        bundle["meta"] = {"lastUpdated": updated.isoformat()}
    bundle["entry"] = [{"fullUrl": full_url_for(key), "resource": item.resource} for key, item in ordered]
    return bundle


def _map(bundle: dict[str, Any], merged: Mapping[str, _StoredResource], group: PatientResources) -> MappedRecord:
    """Map the merged Bundle to the model features; name the input element when the mapping fails."""
    if f"Patient/{group.patient_id}" not in merged:
        first = group.resources[0]
        raise RecordRejected(
            f"{first.location}.subject",
            f"Patient/{group.patient_id} has not been received; send the Patient resource first or in the same input",
        )
    try:
        return features_from_bundle(bundle)
    except InvalidBundleError as error:
        raise RecordRejected(_input_location(error.element_path, merged, group), error.reason) from error


def _input_location(element_path: str, merged: Mapping[str, _StoredResource], group: PatientResources) -> str:
    """Translate ``Bundle.entry[k]...`` of the merged Bundle to the element in the input or the stored resource."""
    ordered = sorted(merged.items(), key=lambda item: (item[1].resource["resourceType"] != "Patient", item[0]))
    prefix, _, rest = element_path.partition("]")
    if not prefix.startswith("Bundle.entry[") or not prefix[len("Bundle.entry[") :].isdigit():
        return element_path
    key = ordered[int(prefix[len("Bundle.entry[") :])][0]
    rest = rest.removeprefix(".resource")
    for item in group.resources:
        if item.key == key:
            return f"{item.location}{rest}"
    return f"{key} (received earlier){rest}"


def _encode_stored(item: _StoredResource) -> str:
    updated = item.updated.isoformat() if item.updated else None
    return dump_fhir_json({"updated": updated, "resource": item.resource})


def _decode_stored(value: bytes) -> _StoredResource:
    data = json.loads(value, parse_float=Decimal)
    updated = datetime.fromisoformat(data["updated"]) if data["updated"] else None
    return _StoredResource(data["resource"], updated.astimezone(UTC) if updated else None)
