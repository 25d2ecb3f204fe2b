"""Reading FHIR R4 input from the integration engine: JSON text, Bundles, single resources, NDJSON.

The functions here are pure: they parse and validate one input and split it
into the resources of each patient. :mod:`producers.intake` merges those with
what was received before and publishes the record.

Accepted shapes: a ``collection``, ``transaction`` or ``batch`` Bundle, a
single resource, and NDJSON bulk-export text (one resource per line, several
patients). Decimals are parsed as :class:`decimal.Decimal` so that ``5.000``
keeps its precision, and :func:`dump_fhir_json` writes them back unchanged.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from crc_medai.errors import CrcMedAiError
from processors.prognosis.errors import InvalidBundleError
from processors.prognosis.fhir_mapping import validate_bundle

#: Bundle types whose entries are taken as the patient's current resources.
ACCEPTED_BUNDLE_TYPES = frozenset({"collection", "transaction", "batch"})
#: Bundle types in which R4 lets an entry omit fullUrl.
FULL_URL_OPTIONAL_TYPES = frozenset({"transaction", "batch"})
#: transaction and batch request methods that write the entry's resource.
WRITE_METHODS = frozenset({"POST", "PUT"})
#: Namespace of the ``urn:uuid`` fullUrls written for entries that came without one.
FULL_URL_NAMESPACE = uuid.UUID("0b7e4a52-8f0c-4c0e-9d51-3f6b2a7c9e10")

# Markers of an element's value in the model check's messages and the texts that can follow it, for without_input_value.
_VALUE_OPENING = " (value "
_VALUE_CLOSING = "; the Bundle must be valid FHIR R4"
_VALUE_TAILS = (
    "; FHIR dates are YYYY, YYYY-MM or YYYY-MM-DD, and a dateTime with a time needs a timezone, "
    "for example 2019-03-01T10:00:00+01:00" + _VALUE_CLOSING,
    _VALUE_CLOSING,
)
_INVALID_CODE = " is not a valid code; expected one of "

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPED_REFERENCE = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$")


class RecordRejected(CrcMedAiError):
    """An input cannot be accepted as a patient record.

    ``element`` is the FHIRPath-like location of the offending element (for
    example ``Bundle.entry[2].resource.birthDate``), or None when the input as
    a whole failed (not JSON, empty). ``reason`` states what is wrong and what to do.
    """

    def __init__(self, element: str | None, reason: str) -> None:
        super().__init__(f"{element}: {reason}" if element else reason)
        self.element = element
        self.reason = reason


@dataclass(frozen=True)
class IncomingResource:
    """One resource of an input, with its location in the input and its identity.

    ``location`` is the element path of the resource in the input, for example
    ``Bundle.entry[3].resource`` or ``Observation`` for a single resource.
    ``updated`` is ``meta.lastUpdated``, else the enclosing Bundle's
    ``meta.lastUpdated`` or ``timestamp``, else None.
    """

    location: str
    resource: dict[str, Any]
    full_url: str | None
    updated: datetime | None

    @property
    def key(self) -> str:
        """Return ``Type/id``, the identity under which a later version replaces this one."""
        return f"{self.resource['resourceType']}/{self.resource['id']}"


@dataclass
class PatientResources:
    """The resources of one input that belong to one patient."""

    patient_id: str
    resources: list[IncomingResource] = field(default_factory=list)


# JSON text


def read_fhir_json(raw: bytes | str) -> Any:
    """Parse FHIR JSON text, keeping the precision of decimals.

    A UTF-8 byte-order mark is skipped. Raises :class:`RecordRejected` for
    text that is not UTF-8, not JSON, has duplicate properties, or numbers
    FHIR does not allow (``.15``, ``NaN``).
    """
    text = _decode(raw)
    try:
        return json.loads(
            text,
            parse_float=_parse_decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_object_without_duplicates,
        )
    except json.JSONDecodeError as error:
        raise RecordRejected(
            None,
            f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}{_json_hint(text, error)}; "
            "send one FHIR R4 resource or Bundle as JSON",
        ) from error


def read_ndjson(raw: bytes | str) -> Iterator[tuple[int, Any | RecordRejected]]:
    """Yield ``(line number, resource)`` per non-empty NDJSON line, or the line's RecordRejected."""
    text = _decode(raw)
    # Split on LF only: str.splitlines also splits on characters such as U+2028 that may sit inside a string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, read_fhir_json(line)
        except RecordRejected as error:
            yield number, RecordRejected(f"line {number}", error.reason)


def dump_fhir_json(value: Any) -> str:
    """Write JSON with every Decimal as its own text, so ``5.000`` stays ``5.000``."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(key))}:{dump_fhir_json(item)}" for key, item in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump_fhir_json(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _decode(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw.removeprefix("\ufeff")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecordRejected(
            None, f"the input is not UTF-8 text (byte {error.start}: {error.reason}); FHIR JSON is UTF-8"
        ) from error


def _parse_decimal(text: str) -> Decimal:
    return Decimal(text)


def _reject_constant(name: str) -> None:
    raise RecordRejected(None, f"the number {name} is not valid JSON or FHIR; send a decimal or leave the value out")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RecordRejected(None, f"property {key!r} appears twice in one JSON object; FHIR JSON forbids that")
        result[key] = value
    return result


def _json_hint(text: str, error: json.JSONDecodeError) -> str:
    """Name the common cause of a JSON error, such as a decimal without a leading zero."""
    rest = text[error.pos : error.pos + 24]
    match = re.match(r"-?\.[0-9]+", rest)
    if match:
        return f" (the number {match.group()!r} needs a digit before the point, for example 0{match.group()})"
    return ""


# Structure and validation


def incoming_resources(data: Any) -> list[IncomingResource]:
    """Validate one input (a Bundle or a single resource) and list its resources.

    The input is checked against the fhir.resources R4B models and the
    required codes :func:`~processors.prognosis.fhir_mapping.validate_bundle`
    checks. References to another entry's fullUrl (``urn:uuid:...``) are
    rewritten to ``Type/id`` so that they still resolve once the resources are
    stored apart from this Bundle.

    Raises:
        RecordRejected: names the element that failed.
    """
    if not isinstance(data, dict):
        raise RecordRejected(None, f"expected a JSON object with a resourceType, got {type(data).__name__}")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise RecordRejected("resourceType", "is missing; every FHIR resource and Bundle names its resourceType")
    if resource_type == "Bundle":
        return _bundle_resources(data)
    return [_single_resource(data)]


def _bundle_resources(bundle: dict[str, Any]) -> list[IncomingResource]:
    _validate(bundle, prefix=None)
    bundle_type = bundle["type"]
    if bundle_type not in ACCEPTED_BUNDLE_TYPES:
        raise RecordRejected(
            "Bundle.type",
            f"{bundle_type!r} is not accepted; send a collection, transaction or batch Bundle",
        )

    bundle_updated = _instant((bundle.get("meta") or {}).get("lastUpdated")) or _instant(bundle.get("timestamp"))
    incoming: list[IncomingResource] = []
    for index, entry in enumerate(bundle.get("entry") or []):
        location = f"Bundle.entry[{index}]"
        _check_entry(entry, location, bundle_type)
        resource = entry["resource"]
        _assign_id(resource, entry.get("fullUrl"), f"{location}.resource")
        _check_contained_references(resource, f"{location}.resource")
        updated = _instant((resource.get("meta") or {}).get("lastUpdated")) or bundle_updated
        incoming.append(IncomingResource(f"{location}.resource", resource, entry.get("fullUrl"), updated))

    _rewrite_full_url_references(incoming)
    return incoming


def _check_entry(entry: dict[str, Any], location: str, bundle_type: str) -> None:
    request = entry.get("request")
    if request is not None and request["method"] not in WRITE_METHODS:
        raise RecordRejected(
            f"{location}.request.method",
            f"{request['method']} is not accepted; send POST or PUT entries, and mark a resource sent in error "
            "with status entered-in-error instead of deleting it",
        )
    if "resource" not in entry:
        raise RecordRejected(f"{location}.resource", "is missing; every entry must carry the resource it writes")
    if entry.get("fullUrl"):
        return
    if bundle_type not in FULL_URL_OPTIONAL_TYPES:
        raise RecordRejected(
            f"{location}.fullUrl",
            f"is missing; FHIR R4 requires a fullUrl on every entry of a {bundle_type} Bundle "
            "(only transaction and batch entries may omit it), for example urn:uuid:<uuid> or <base>/Patient/<id>",
        )
    relative = next((ref for ref in references_in(entry["resource"]) if _TYPED_REFERENCE.fullmatch(ref)), None)
    if relative is not None:
        # Relative references resolve against the entry's fullUrl, so the HAPI FHIR validator rejects them without one.
        raise RecordRejected(
            f"{location}.fullUrl",
            f"is missing, but the resource contains the relative reference {relative!r}, which resolves against "
            "the fullUrl; add a fullUrl such as <base>/<Type>/<id> or urn:uuid:<uuid>",
        )


def _single_resource(resource: dict[str, Any]) -> IncomingResource:
    kind = resource["resourceType"]
    _validate({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": resource}]}, prefix=kind)
    _assign_id(resource, None, kind)
    _check_contained_references(resource, kind)
    updated = _instant((resource.get("meta") or {}).get("lastUpdated"))
    return IncomingResource(kind, resource, None, updated)


def _validate(bundle: dict[str, Any], prefix: str | None) -> None:
    """Run the R4B model check; ``prefix`` replaces the wrapper path for a single resource."""
    try:
        validate_bundle(bundle)
    except InvalidBundleError as error:
        element = error.element_path
        if prefix is not None:
            element = element.replace("Bundle.entry[0].resource", prefix, 1)
        raise RecordRejected(element, _explain(without_input_value(error.reason))) from error


def without_input_value(reason: str) -> str:
    """Remove the element's value from a model check message, because the value may be PHI.

    The model check (:func:`processors.prognosis.fhir_mapping.validate_bundle`)
    writes ``<message> (value <repr>)<hint>; the Bundle must be valid FHIR R4``
    for a schema error and ``<repr> is not a valid code; expected one of [...]``
    for a code outside its value set. Everything after the value is kept only
    when it is one of those known tails, so no part of the value survives.
    """
    code = reason.rfind(_INVALID_CODE)
    if code >= 0:
        return reason[code + 1 :]
    start = reason.find(_VALUE_OPENING)
    if start < 0:
        return reason
    tail = next((tail for tail in _VALUE_TAILS if reason.endswith(tail)), "")
    return reason[:start].rstrip(".") + tail


def _explain(reason: str) -> str:
    """Add the usual cause to the model's message about an element FHIR R4 does not define."""
    if reason.startswith("Extra inputs are not permitted"):
        return (
            "is not an element of this resource in FHIR R4 (4.0.1); remove it, move local data into an extension, "
            "or convert STU3 and R5 resources to R4 before sending"
        )
    return reason


def _assign_id(resource: dict[str, Any], full_url: str | None, location: str) -> None:
    """Give a resource without id the id its fullUrl carries (``urn:uuid:<uuid>`` or ``.../Type/id``)."""
    if resource.get("id"):
        return
    candidate = None
    if full_url and full_url.startswith("urn:uuid:"):
        candidate = full_url.removeprefix("urn:uuid:")
    elif full_url and (match := _TYPED_REFERENCE.search(full_url)):
        candidate = match.group("id")
    if candidate is None or not _FHIR_ID.match(candidate):
        raise RecordRejected(
            f"{location}.id",
            "is missing and no fullUrl gives one; give every resource an id so that a later version can replace it",
        )
    resource["id"] = candidate


def _check_contained_references(resource: dict[str, Any], location: str) -> None:
    """Reject a ``#id`` reference that names no contained resource (FHIR R4 ref-1)."""
    contained = {item.get("id") for item in resource.get("contained") or []}
    for reference in references_in(resource):
        if reference.startswith("#") and reference != "#" and reference[1:] not in contained:
            raise RecordRejected(
                f"{location}.contained",
                f"the reference {reference!r} names no contained resource; add the resource to contained "
                f"with id {reference[1:]!r} or refer to a resource outside",
            )


def _rewrite_full_url_references(incoming: list[IncomingResource]) -> None:
    targets = {item.full_url: item.key for item in incoming if item.full_url}
    for item in incoming:
        _rewrite_references(item.resource, targets)


def _rewrite_references(node: Any, targets: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and reference in targets:
            node["reference"] = targets[reference]
        for key, value in node.items():
            if key != "reference":
                _rewrite_references(value, targets)
    elif isinstance(node, list):
        for value in node:
            _rewrite_references(value, targets)


def _instant(text: object) -> datetime | None:
    if not isinstance(text, str) or len(text) < 10:
        return None
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        return None
    return instant.astimezone(UTC) if instant.tzinfo else None


# Patients


def group_by_patient(incoming: list[IncomingResource]) -> dict[str, PatientResources]:
    """Split resources by the Patient they belong to.

    A Patient belongs to itself; another resource to the Patient its
    ``subject`` (or ``patient``) refers to. A resource without such a
    reference (a Medication) goes with the patients whose resources refer to
    it, or with the only patient of the input.

    Raises:
        RecordRejected: a reference names no Patient, or a resource cannot be placed.
    """
    groups: dict[str, PatientResources] = {}
    unplaced: list[IncomingResource] = []
    for item in incoming:
        patient_id = _patient_of(item)
        if patient_id is None:
            unplaced.append(item)
            continue
        groups.setdefault(patient_id, PatientResources(patient_id)).resources.append(item)

    for item in unplaced:
        owners = [group for group in groups.values() if any(_refers_to(other, item.key) for other in group.resources)]
        if not owners and len(groups) == 1:
            owners = list(groups.values())
        if not owners:
            raise RecordRejected(
                item.location,
                f"{item.key} names no patient and no resource of a patient refers to it; "
                "set subject to the Patient or send it with the resources that refer to it",
            )
        for group in owners:
            group.resources.append(item)
    return groups


def _patient_of(item: IncomingResource) -> str | None:
    resource = item.resource
    if resource["resourceType"] == "Patient":
        return resource["id"]
    for element in ("subject", "patient"):
        target = resource.get(element)
        if not isinstance(target, dict) or "reference" not in target:
            continue
        reference = target["reference"]
        match = _TYPED_REFERENCE.search(reference)
        if match is None or match.group("type") != "Patient":
            raise RecordRejected(
                f"{item.location}.{element}.reference",
                f"{reference!r} is not a reference to a Patient in this input or on a server "
                "(expected Patient/<id>, <base>/Patient/<id> or the fullUrl of the Patient entry)",
            )
        return match.group("id")
    return None


def _refers_to(item: IncomingResource, key: str) -> bool:
    return any(reference == key or reference.endswith(f"/{key}") for reference in references_in(item.resource))


def references_in(node: Any) -> Iterator[str]:
    """Yield every ``reference`` string inside a resource, contained resources included."""
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str):
            yield reference
        for key, value in node.items():
            if key != "reference":
                yield from references_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from references_in(value)


def full_url_for(key: str) -> str:
    """Return the ``urn:uuid`` fullUrl written for a stored resource ``Type/id``."""
    return f"urn:uuid:{uuid.uuid5(FULL_URL_NAMESPACE, key)}"
