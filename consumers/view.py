"""The FHIR view: the latest version of each resource on ``fhir-resources``, kept in Redis.

The ``fhir-view`` worker (``crc-medai fhir-view``) writes every resource event
into Redis; the FHIR read API (:mod:`consumers.fhir_api`) reads from it. The
view contains nothing that is not on the topic, so ``crc-medai fhir-view
--rebuild`` deletes it and replays the topic from the beginning.

Redis layout, every key under ``settings.redis_key("fhir-view:")``:

- ``r:{type}/{id}``: hash with the resource JSON, the Kafka partition and
  offset of the event that wrote it, and the search index terms it is filed under;
- ``ids:{type}``: set of the ids of every resource of that type;
- ``idx:{type}:{term}``: set of the ids filed under a search term such as
  ``code:http://snomed.info/sct|68496003`` or ``patient:Patient/pt-1``.

A write carries the Kafka offset of its event and is skipped when the view
already contains a later offset of the same partition. Records are keyed by
resource id, so each resource stays on one partition, and replaying the topic
in any state of the view ends in the same view.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import redis
import redis.asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from crc_medai.errors import CrcMedAiError
from crc_medai.settings import Settings
from schemas.messages import FhirResourceEvent

logger = logging.getLogger(__name__)

SERVICE = "fhir-view"

#: Resource types the view serves; other types on the topic are skipped.
RESOURCE_TYPES: tuple[str, ...] = ("Observation", "RiskAssessment", "DiagnosticReport", "Media", "Device")

#: Logical Redis key under which the whole view lives.
VIEW_KEY = "fhir-view:"

# Atomic conditional write of one resource. KEYS: resource hash, ids set. ARGV: id, resource JSON,
# partition, offset, index terms (JSON list), prefix of the index set keys.
# NOTE: the script writes index keys that are not listed in KEYS. Standalone Redis allows this but Redis
# Cluster does not, so the view needs a standalone Redis.
_PUT_SCRIPT = """
local partition = redis.call('HGET', KEYS[1], 'partition')
local offset = redis.call('HGET', KEYS[1], 'offset')
if offset and partition == ARGV[3] and tonumber(offset) >= tonumber(ARGV[4]) then
  return 0
end
local old_terms = redis.call('HGET', KEYS[1], 'terms')
if old_terms then
  for _, term in ipairs(cjson.decode(old_terms)) do
    redis.call('SREM', ARGV[6] .. term, ARGV[1])
  end
end
for _, term in ipairs(cjson.decode(ARGV[5])) do
  redis.call('SADD', ARGV[6] .. term, ARGV[1])
end
redis.call('HSET', KEYS[1], 'resource', ARGV[2], 'partition', ARGV[3], 'offset', ARGV[4], 'terms', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""


class ViewError(CrcMedAiError):
    """A resource event cannot be written to the view."""


class SearchParameterError(CrcMedAiError):
    """A search request names an unknown parameter or gives a value that cannot be parsed."""


# --- search parameters -------------------------------------------------------------------------

SearchType = Literal["token", "reference", "date", "string"]


@dataclass(frozen=True)
class SearchParameter:
    """A FHIR search parameter the view supports, with the elements it reads."""

    name: str
    type: SearchType
    elements: tuple[str, ...]
    description: str
    #: For reference parameters, the only resource type they match (``patient`` -> Patient).
    target: str | None = None


def _params(*items: SearchParameter) -> dict[str, SearchParameter]:
    return {item.name: item for item in items}


_IDENTIFIER = SearchParameter("identifier", "token", ("identifier",), "An identifier, [system]|[value]")
_PATIENT = SearchParameter("patient", "reference", ("subject",), "The patient, Patient/[id] or [id]", "Patient")
_SUBJECT = SearchParameter("subject", "reference", ("subject",), "The subject, [type]/[id] or [id]")
_ENCOUNTER = SearchParameter("encounter", "reference", ("encounter",), "The encounter, Encounter/[id] or [id]")
_CODE = SearchParameter("code", "token", ("code",), "The code, [system]|[code], [code] or [system]|")

#: Search parameters per resource type, with the R4 names and meanings.
SEARCH_PARAMETERS: dict[str, dict[str, SearchParameter]] = {
    "Observation": _params(
        _IDENTIFIER,
        _PATIENT,
        _SUBJECT,
        _ENCOUNTER,
        _CODE,
        SearchParameter(
            "date", "date", ("effectiveDateTime", "effectivePeriod", "effectiveInstant"), "Clinically relevant time"
        ),
    ),
    "RiskAssessment": _params(
        _IDENTIFIER,
        _PATIENT,
        _SUBJECT,
        _ENCOUNTER,
        SearchParameter("code", "token", ("code",), "The type of assessment, [system]|[code]"),
        SearchParameter("date", "date", ("occurrenceDateTime", "occurrencePeriod"), "When the assessment was made"),
    ),
    "DiagnosticReport": _params(
        _IDENTIFIER,
        _PATIENT,
        _SUBJECT,
        _ENCOUNTER,
        _CODE,
        SearchParameter("date", "date", ("effectiveDateTime", "effectivePeriod"), "Clinically relevant time"),
    ),
    "Media": _params(
        _IDENTIFIER,
        _PATIENT,
        _SUBJECT,
        _ENCOUNTER,
        SearchParameter("type", "token", ("type",), "The type of media, [system]|[code]"),
        SearchParameter("created", "date", ("createdDateTime", "createdPeriod"), "When the media was collected"),
    ),
    # R4 gives Device no code, date or encounter parameters; type, names and patient are its equivalents.
    "Device": _params(
        _IDENTIFIER,
        SearchParameter("patient", "reference", ("patient",), "The patient the device is affixed to", "Patient"),
        SearchParameter("type", "token", ("type",), "The type of device, [system]|[code]"),
        SearchParameter("device-name", "string", ("deviceName",), "A name of the device, matched from its start"),
        SearchParameter("manufacturer", "string", ("manufacturer",), "The manufacturer, matched from its start"),
    ),
}

#: Search result parameters the API handles besides the resource's own parameters.
RESULT_PARAMETERS = ("_id", "_count", "_offset", "_format")

DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def index_terms(resource: dict[str, Any]) -> list[str]:
    """Return the search terms a resource is filed under: its token and reference values."""
    parameters = SEARCH_PARAMETERS.get(resource.get("resourceType", ""), {})
    terms: set[str] = set()
    for parameter in parameters.values():
        if parameter.type == "token":
            for system, code in _tokens(resource, parameter):
                terms.update(_token_terms(parameter.name, system, code))
        elif parameter.type == "reference":
            for reference in _references(resource, parameter):
                type_and_id = _reference_type_and_id(reference)
                if type_and_id is not None:
                    terms.add(f"{parameter.name}:{type_and_id}")
                    terms.add(f"{parameter.name}:{type_and_id.rpartition('/')[2]}")
    return sorted(terms)


def _values(resource: dict[str, Any], element: str) -> list[Any]:
    value = resource.get(element)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _tokens(resource: dict[str, Any], parameter: SearchParameter) -> list[tuple[str | None, str]]:
    tokens: list[tuple[str | None, str]] = []
    for element in parameter.elements:
        for value in _values(resource, element):
            if not isinstance(value, dict):
                continue
            if "value" in value:  # Identifier
                tokens.append((value.get("system"), str(value["value"])))
            for coding in value.get("coding") or []:  # CodeableConcept
                if coding.get("code") is not None:
                    tokens.append((coding.get("system"), str(coding["code"])))
    return tokens


def _token_terms(name: str, system: str | None, code: str) -> list[str]:
    if system is None:
        return [f"{name}:|{code}", f"{name}:*|{code}"]
    return [f"{name}:{system}|{code}", f"{name}:*|{code}", f"{name}:{system}|*"]


def _references(resource: dict[str, Any], parameter: SearchParameter) -> list[str]:
    references = []
    for element in parameter.elements:
        for value in _values(resource, element):
            reference = value.get("reference") if isinstance(value, dict) else None
            if reference and (parameter.target is None or _reference_type(reference) == parameter.target):
                references.append(reference)
    return references


def _reference_type(reference: str) -> str | None:
    type_and_id = _reference_type_and_id(reference)
    return type_and_id.partition("/")[0] if type_and_id else None


def _reference_type_and_id(reference: str) -> str | None:
    """Return ``Type/id`` of a relative or absolute literal reference, None for others (``urn:uuid:``)."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) < 2 or not parts[-2][:1].isupper():
        return None
    return f"{parts[-2]}/{parts[-1]}"


# --- search requests ---------------------------------------------------------------------------

ResourceFilter = Callable[[dict[str, Any]], bool]


@dataclass
class SearchQuery:
    """A parsed search: index terms to intersect (each a union of terms), then filters on the resources."""

    resource_type: str
    ids: set[str] | None = None
    term_groups: list[list[str]] = field(default_factory=list)
    filters: list[ResourceFilter] = field(default_factory=list)


def parse_search(resource_type: str, parameters: Sequence[tuple[str, str]]) -> SearchQuery:
    """Parse search parameters (name, value) into a :class:`SearchQuery`.

    A repeated parameter is a logical AND; comma-separated values of one
    parameter are a logical OR, as in FHIR R4 search.

    Raises:
        SearchParameterError: an unknown parameter, a modifier, or a value that cannot be parsed.
    """
    supported = SEARCH_PARAMETERS[resource_type]
    query = SearchQuery(resource_type)
    for name, value in parameters:
        if name in RESULT_PARAMETERS:
            if name == "_id":
                ids = set(_split_values(name, value))
                query.ids = ids if query.ids is None else query.ids & ids
            continue
        parameter = supported.get(name)
        if parameter is None:
            raise SearchParameterError(_unknown_parameter_message(resource_type, name))
        _add_criterion(query, parameter, _split_values(name, value))
    return query


def _unknown_parameter_message(resource_type: str, name: str) -> str:
    known = ", ".join([*SEARCH_PARAMETERS[resource_type], *RESULT_PARAMETERS])
    if ":" in name:
        return f"search parameter {name!r}: modifiers are not supported on {resource_type}; use one of: {known}"
    return f"unknown search parameter {name!r} for {resource_type}; use one of: {known}"


def _split_values(name: str, value: str) -> list[str]:
    values = [item for item in value.split(",") if item]
    if not values:
        raise SearchParameterError(f"search parameter {name!r} has an empty value; give a value or leave it out")
    return values


def _add_criterion(query: SearchQuery, parameter: SearchParameter, values: list[str]) -> None:
    if parameter.type == "token":
        query.term_groups.append([_token_query_term(parameter.name, value) for value in values])
    elif parameter.type == "reference":
        query.term_groups.append([_reference_query_term(parameter, value) for value in values])
    elif parameter.type == "date":
        predicates = [_date_predicate(parameter.name, value) for value in values]
        query.filters.append(lambda resource: _matches_dates(resource, parameter, predicates))
    else:
        prefixes = [value.casefold() for value in values]
        query.filters.append(lambda resource: _matches_strings(resource, parameter, prefixes))


def _token_query_term(name: str, value: str) -> str:
    if "|" not in value:
        return f"{name}:*|{value}"
    system, _, code = value.partition("|")
    if not system and not code:
        raise SearchParameterError(f"search parameter {name}={value!r} has neither system nor code")
    return f"{name}:{system}|{code or '*'}"


def _reference_query_term(parameter: SearchParameter, value: str) -> str:
    if "/" not in value:
        return f"{parameter.name}:{parameter.target}/{value}" if parameter.target else f"{parameter.name}:{value}"

    type_and_id = _reference_type_and_id(value)
    if type_and_id is None:
        raise SearchParameterError(
            f"search parameter {parameter.name}={value!r} is not a reference; use [type]/[id] or [id]"
        )
    return f"{parameter.name}:{type_and_id}"


def _matches_strings(resource: dict[str, Any], parameter: SearchParameter, prefixes: list[str]) -> bool:
    strings = []
    for element in parameter.elements:
        for value in _values(resource, element):
            strings.append(value.get("name", "") if isinstance(value, dict) else str(value))
    return any(text.casefold().startswith(prefix) for text in strings for prefix in prefixes)


# --- dates -------------------------------------------------------------------------------------

Interval = tuple[datetime, datetime]
DatePredicate = Callable[[Interval], bool]

_DATE_PATTERN = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def date_interval(text: str) -> Interval:
    """Return the interval [start, end) a FHIR date or dateTime covers at its precision.

    ``2024`` covers the whole year and ``2024-05-02T10:00:00Z`` one second.
    NOTE: a value without a timezone is read as UTC.

    Raises:
        ValueError: when ``text`` is not a FHIR date or dateTime.
    """
    match = _DATE_PATTERN.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ssZ)")

    parts = match.groupdict()
    zone = _timezone(parts["zone"])
    year, month, day = int(parts["year"]), int(parts["month"] or 1), int(parts["day"] or 1)
    hour, minute, second = int(parts["hour"] or 0), int(parts["minute"] or 0), int(parts["second"] or 0)
    fraction = parts["fraction"] or ""
    try:
        start = datetime(year, month, day, hour, minute, second, int(float(fraction or 0) * 1_000_000), tzinfo=zone)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date: {exc}") from exc
    return start.astimezone(UTC), _interval_end(start, parts, fraction).astimezone(UTC)


def _timezone(zone: str | None) -> timezone:
    if zone in (None, "Z"):
        return UTC
    sign = 1 if zone[0] == "+" else -1
    return timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))


def _interval_end(start: datetime, parts: dict[str, str | None], fraction: str) -> datetime:
    if parts["month"] is None:
        return start.replace(year=start.year + 1) if start.year < 9999 else _LATEST
    if parts["day"] is None:
        return (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
    if parts["hour"] is None:
        return start + timedelta(days=1)
    if parts["second"] is None:
        return start + timedelta(minutes=1)
    if fraction:
        return start + timedelta(seconds=10 ** -(len(fraction) - 1))
    return start + timedelta(seconds=1)


def _date_predicate(name: str, value: str) -> DatePredicate:
    prefix, text = (value[:2], value[2:]) if value[:2] in DATE_PREFIXES else ("eq", value)
    try:
        low, high = date_interval(text)
    except ValueError as exc:
        raise SearchParameterError(f"search parameter {name}={value!r}: {exc}") from exc
    except OverflowError as exc:
        raise SearchParameterError(f"search parameter {name}={value!r} is out of the supported date range") from exc

    # FHIR R4 search, "date" type: each prefix compares the range of the search value with the
    # range of the resource's value. ge and le also accept what eq accepts.
    def equal(target: Interval) -> bool:
        return low <= target[0] and target[1] <= high

    comparisons: dict[str, DatePredicate] = {
        "eq": equal,
        "ne": lambda target: not equal(target),
        "gt": lambda target: target[1] > high,
        "lt": lambda target: target[0] < low,
        "ge": lambda target: target[1] > high or equal(target),
        "le": lambda target: target[0] < low or equal(target),
        "sa": lambda target: target[0] >= high,
        "eb": lambda target: target[1] <= low,
    }
    return comparisons[prefix]


def _matches_dates(resource: dict[str, Any], parameter: SearchParameter, predicates: list[DatePredicate]) -> bool:
    intervals = resource_intervals(resource, parameter.elements)
    return any(predicate(interval) for interval in intervals for predicate in predicates)


def resource_intervals(resource: dict[str, Any], elements: Iterable[str]) -> list[Interval]:
    """Return the time intervals of a resource's date elements (dateTime, instant or Period)."""
    intervals = []
    for element in elements:
        value = resource.get(element)
        try:
            if isinstance(value, str):
                intervals.append(date_interval(value))
            elif isinstance(value, dict):
                low = date_interval(value["start"])[0] if value.get("start") else _EARLIEST
                high = date_interval(value["end"])[1] if value.get("end") else _LATEST
                intervals.append((low, high))
        except ValueError:
            logger.warning("unreadable date skipped resource=%s/%s element=%s", *_ref(resource), element)
    return intervals


def _ref(resource: dict[str, Any]) -> tuple[str, str]:
    return resource.get("resourceType", "?"), resource.get("id", "?")


# --- reading and writing the view ---------------------------------------------------------------


class ViewKeys:
    """Redis key names of one view."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def resource(self, resource_type: str, resource_id: str) -> str:
        return f"{self.prefix}r:{resource_type}/{resource_id}"

    def ids(self, resource_type: str) -> str:
        return f"{self.prefix}ids:{resource_type}"

    def index_prefix(self, resource_type: str) -> str:
        return f"{self.prefix}idx:{resource_type}:"

    def pattern(self) -> str:
        """Return a SCAN pattern that matches every key of the view."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"


def view_keys(settings: Settings) -> ViewKeys:
    """Return the key names of the view of ``settings`` (its Redis key prefix and topic prefix)."""
    return ViewKeys(settings.redis_key(VIEW_KEY))


class FhirView:
    """Reads the view: resources by id and searches (synchronous, for the API's worker threads)."""

    def __init__(self, client: redis.Redis, keys: ViewKeys) -> None:
        self.client = client
        self.keys = keys

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """Return the latest version of a resource, or None when the view has none."""
        text = self.client.hget(self.keys.resource(resource_type, resource_id), "resource")
        return None if text is None else json.loads(text)

    def search(self, query: SearchQuery) -> list[dict[str, Any]]:
        """Return every resource that matches ``query``, ordered by id."""
        ids = self._candidate_ids(query)
        resources = self._load(query.resource_type, sorted(ids))
        return [resource for resource in resources if all(check(resource) for check in query.filters)]

    def _candidate_ids(self, query: SearchQuery) -> set[str]:
        prefix = self.keys.index_prefix(query.resource_type)
        pipeline = self.client.pipeline(transaction=False)
        pipeline.smembers(self.keys.ids(query.resource_type))
        for group in query.term_groups:
            pipeline.sunion([prefix + term for term in group])
        results = pipeline.execute()

        ids = {_text(item) for item in results[0]}
        for members in results[1:]:
            ids &= {_text(item) for item in members}
        if query.ids is not None:
            ids &= query.ids
        return ids

    def _load(self, resource_type: str, ids: list[str]) -> list[dict[str, Any]]:
        pipeline = self.client.pipeline(transaction=False)
        for resource_id in ids:
            pipeline.hget(self.keys.resource(resource_type, resource_id), "resource")
        # A resource replaced between the two round trips can be missing; it is left out.
        return [json.loads(text) for text in pipeline.execute() if text is not None]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Return every resource of the view by ``Type/id`` (for tests and checks)."""
        snapshot = {}
        for resource_type in RESOURCE_TYPES:
            for resource in self.search(SearchQuery(resource_type)):
                snapshot[f"{resource_type}/{resource['id']}"] = resource
        return snapshot


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class ViewWriter:
    """Writes resource events into the view (asynchronous, for the worker and the rebuild)."""

    def __init__(self, client: redis.asyncio.Redis, keys: ViewKeys) -> None:
        self.client = client
        self.keys = keys
        self._put = client.register_script(_PUT_SCRIPT)

    async def put(self, event: FhirResourceEvent, partition: int, offset: int) -> bool:
        """Write the resource of ``event`` unless the view contains a later offset; return whether it wrote."""
        resource = event.resource
        if resource.get("resourceType") != event.resource_type or resource.get("id") != event.resource_id:
            raise ViewError(
                f"event {event.event_id} names {event.resource_type}/{event.resource_id} but carries "
                f"{resource.get('resourceType')}/{resource.get('id')}; the producer must send matching fields"
            )

        written = await self._put(
            keys=[self.keys.resource(event.resource_type, event.resource_id), self.keys.ids(event.resource_type)],
            args=[
                event.resource_id,
                json.dumps(resource, sort_keys=True),
                partition,
                offset,
                json.dumps(index_terms(resource)),
                self.keys.index_prefix(event.resource_type),
            ],
        )
        return bool(written)

    async def clear(self) -> int:
        """Delete every key of the view; return how many were deleted."""
        deleted = 0
        batch: list[str | bytes] = []
        async for key in self.client.scan_iter(match=self.keys.pattern(), count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self.client.delete(*batch)
                batch.clear()
        if batch:
            deleted += await self.client.delete(*batch)
        return deleted


def parse_event(value: bytes | None) -> FhirResourceEvent:
    """Parse a ``fhir-resources`` record value; raises ValidationError or ValueError."""
    return FhirResourceEvent.from_bytes(value)


# --- the worker and the rebuild -----------------------------------------------------------------


def build_app(settings: Settings):  # noqa: ANN201 - returns faust.App
    """Build the view worker's Faust app: one agent that writes ``fhir-resources`` into Redis."""
    from faust import current_event

    from processors.app import create_app, process_with_dead_letter, raw_topic

    app = create_app(settings, SERVICE)
    resources = raw_topic(app, settings, FhirResourceEvent.topic)
    dead_letter = raw_topic(app, settings, f"dlq.{SERVICE}")
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    writer = ViewWriter(client, view_keys(settings))
    logger.info("fhir view ready key_prefix=%s", writer.keys.prefix)

    async def handle(key: bytes | None, value: bytes | None) -> None:
        event = parse_event(value)
        message = current_event().message
        if event.resource_type not in RESOURCE_TYPES:
            logger.debug("resource type not served type=%s id=%s", event.resource_type, event.resource_id)
            return
        written = await writer.put(event, message.partition, message.offset)
        logger.debug(
            "view %s type=%s id=%s partition=%s offset=%s",
            "updated" if written else "unchanged",
            event.resource_type,
            event.resource_id,
            message.partition,
            message.offset,
        )

    @app.agent(resources)
    async def view_resources(stream) -> None:  # noqa: ANN001 - faust stream
        await process_with_dead_letter(stream, service=SERVICE, dead_letter=dead_letter, handle=handle)

    @app.on_before_shutdown.connect
    async def close_redis(app_: object, **_: object) -> None:
        await client.aclose()

    return app


@dataclass
class RebuildSummary:
    """Counts of one rebuild.

    ``skipped`` counts records of resource types the view does not serve, and
    ``rejected`` counts invalid records.
    """

    deleted_keys: int = 0
    records: int = 0
    written: int = 0
    skipped: int = 0
    rejected: int = 0


async def rebuild(settings: Settings, *, timeout_s: float = 600.0) -> RebuildSummary:
    """Delete the view, then replay ``fhir-resources`` from the beginning to the current end offsets.

    Invalid records are counted as rejected and skipped. The ``fhir-view`` worker sends them
    to ``dlq.fhir-view`` when it reads them, so the rebuild does not send them again.
    """
    summary = RebuildSummary()
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    writer = ViewWriter(client, view_keys(settings))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        end_offsets = await _assign_whole_topic(consumer, settings)
        summary.deleted_keys = await writer.clear()
        await asyncio.wait_for(_replay(consumer, writer, end_offsets, summary), timeout=timeout_s)
    finally:
        await consumer.stop()
        await client.aclose()
    logger.info(
        "fhir view rebuilt deleted_keys=%d records=%d written=%d skipped=%d rejected=%d",
        summary.deleted_keys,
        summary.records,
        summary.written,
        summary.skipped,
        summary.rejected,
    )
    return summary


async def _assign_whole_topic(consumer: AIOKafkaConsumer, settings: Settings) -> dict[TopicPartition, int]:
    topic = settings.topic(FhirResourceEvent.topic)
    numbers = await _partition_numbers(settings, topic)
    if not numbers:
        raise ViewError(f"topic {topic} not found on the broker; nothing to rebuild the view from")

    assignment = [TopicPartition(topic, number) for number in sorted(numbers)]
    consumer.assign(assignment)
    await consumer.seek_to_beginning(*assignment)
    end_offsets = await consumer.end_offsets(assignment)
    return {partition: offset for partition, offset in end_offsets.items() if offset > 0}


async def _partition_numbers(settings: Settings, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return [
        partition["partition"]
        for item in described
        if item["topic"] == topic and item["error_code"] == 0
        for partition in item["partitions"]
    ]


async def _replay(
    consumer: AIOKafkaConsumer, writer: ViewWriter, end_offsets: dict[TopicPartition, int], summary: RebuildSummary
) -> None:
    remaining = dict(end_offsets)
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=1000)
        for partition, messages in batches.items():
            for message in messages:
                if message.offset >= end_offsets[partition]:
                    break
                await _replay_record(writer, message.value, partition.partition, message.offset, summary)
            if await consumer.position(partition) >= end_offsets[partition]:
                remaining.pop(partition, None)


async def _replay_record(
    writer: ViewWriter, value: bytes | None, partition: int, offset: int, summary: RebuildSummary
) -> None:
    summary.records += 1
    try:
        event = parse_event(value)
        if event.resource_type not in RESOURCE_TYPES:
            summary.skipped += 1
            return
        written = await writer.put(event, partition, offset)
    except (ValidationError, ValueError, ViewError) as exc:
        summary.rejected += 1
        logger.warning("record skipped in rebuild partition=%d offset=%d error=%s", partition, offset, exc)
        return
    if written:
        summary.written += 1
    else:
        summary.skipped += 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``crc-medai fhir-view``: run the worker, or rebuild the view with ``--rebuild``."""
    from crc_medai.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="crc-medai fhir-view",
        description=(
            "Run the FHIR view worker, a Faust worker that keeps the latest version of each resource on "
            "fhir-resources in Redis, or rebuild that view with --rebuild. Settings come from CRC_* environment "
            "variables (see crc_medai/settings.py), for example CRC_KAFKA_BOOTSTRAP_SERVERS, CRC_REDIS_URL and "
            "CRC_REDIS_KEY_PREFIX."
        ),
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="delete the view and replay fhir-resources from the beginning, then exit",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the rebuild may take (default 600)")
    args = parser.parse_args(argv)
    if not args.rebuild:
        from crc_medai.cli import run_service
        from crc_medai.kafka import ensure_topics

        asyncio.run(ensure_topics(get_settings(), [FhirResourceEvent.topic, f"dlq.{SERVICE}"]))
        return run_service(SERVICE)

    summary = asyncio.run(rebuild(get_settings(), timeout_s=args.timeout))
    print(json.dumps(summary.__dict__))
    return 0
