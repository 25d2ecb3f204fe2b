"""FHIR R4 transaction Bundles with conditional updates keyed on identifiers.

Each resource becomes one ``PUT [type]?identifier=[system]|[value]`` entry. A
FHIR server then updates the resource that carries that identifier, or creates
it when none does (FHIR R4 RESTful API, conditional update:
http://hl7.org/fhir/R4/http.html#cond-update). So a replayed resource updates
its earlier copy instead of adding a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from crc_medai.errors import CrcMedAiError

#: Identifier systems this project gives its resources; such an identifier is preferred as the update key.
PROJECT_IDENTIFIER_PREFIX = "urn:crc-medai:"

#: Base of the entries' fullUrl when the caller names no server, a URL that only names the resource.
DEFAULT_BASE_URL = "https://crc-medai.example/fhir"

# Characters left as they are in the identifier search value; ``|`` separates system and value.
_SAFE_QUERY_CHARACTERS = ":/.-_~"


class TransactionError(CrcMedAiError):
    """A resource cannot be put in a transaction Bundle (missing id, type or identifier)."""


def transaction_bundle(resources: Sequence[dict[str, Any]], *, base_url: str = DEFAULT_BASE_URL) -> dict[str, Any]:
    """Build a transaction Bundle with one conditional update per resource.

    ``fullUrl`` is ``[base_url]/[type]/[id]``, consistent with the resource id
    as R4 requires. Entries keep the order of ``resources``.

    Raises:
        TransactionError: when ``resources`` is empty, a resource has no
            ``resourceType`` or ``id``, or it has no identifier with a system and
            a value, or two resources share a conditional URL.
    """
    if not resources:
        raise TransactionError("a transaction Bundle needs at least one resource; got none")

    base = base_url.rstrip("/")
    entries = [transaction_entry(resource, base) for resource in resources]
    _check_unique_urls(entries)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def transaction_entry(resource: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Build the Bundle entry that updates ``resource`` conditionally on its identifier."""
    resource_type = resource.get("resourceType")
    resource_id = resource.get("id")
    if not resource_type or not resource_id:
        raise TransactionError(
            f"resource with resourceType={resource_type!r} id={resource_id!r} cannot be delivered: "
            "both resourceType and id are required"
        )

    return {
        "fullUrl": f"{base_url}/{resource_type}/{resource_id}",
        "resource": resource,
        "request": {"method": "PUT", "url": conditional_url(resource)},
    }


def conditional_url(resource: dict[str, Any]) -> str:
    """Return ``[type]?identifier=[system]|[value]``, the URL of the resource's conditional update."""
    system, value = update_identifier(resource)
    token = f"{quote(system, safe=_SAFE_QUERY_CHARACTERS)}|{quote(value, safe=_SAFE_QUERY_CHARACTERS)}"
    return f"{resource['resourceType']}?identifier={token}"


def update_identifier(resource: dict[str, Any]) -> tuple[str, str]:
    """Return the (system, value) that keys the conditional update of ``resource``.

    An identifier whose system starts with ``urn:crc-medai:`` wins, because the
    project assigns and keeps those values. Otherwise the first identifier with
    both a system and a value is used.
    """
    identifiers = [
        (item["system"], item["value"])
        for item in resource.get("identifier") or []
        if isinstance(item, dict) and item.get("system") and item.get("value")
    ]
    if not identifiers:
        raise TransactionError(
            f"{resource.get('resourceType')}/{resource.get('id')} has no identifier with both system and value; "
            "a conditional update needs one, so add an identifier to the resource"
        )

    for system, value in identifiers:
        if system.startswith(PROJECT_IDENTIFIER_PREFIX):
            return system, value
    return identifiers[0]


def _check_unique_urls(entries: list[dict[str, Any]]) -> None:
    # A server rejects a transaction that updates the same conditional URL twice (or two fullUrls alike).
    for field in ("fullUrl", "request"):
        seen: set[str] = set()
        for entry in entries:
            key = entry[field] if field == "fullUrl" else entry["request"]["url"]
            if key in seen:
                raise TransactionError(
                    f"two resources in one transaction Bundle share {field} {key}; "
                    "send only the latest version of each resource (see latest_versions)"
                )
            seen.add(key)


def latest_versions(resources: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last of the resources that share a type and id or an update identifier, in arrival order."""
    latest: dict[tuple[str, str], int] = {}
    for index, resource in enumerate(resources):
        for key in _resource_keys(resource):
            latest[key] = index

    kept = sorted(set(latest.values()))
    return [resources[index] for index in kept if all(latest[key] == index for key in _resource_keys(resources[index]))]


def _resource_keys(resource: dict[str, Any]) -> list[tuple[str, str]]:
    keys = [("id", f"{resource.get('resourceType')}/{resource.get('id')}")]
    try:
        keys.append(("url", conditional_url(resource)))
    except (TransactionError, KeyError):
        pass
    return keys
