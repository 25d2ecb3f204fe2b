"""FHIR delivery: resources from ``fhir-resources`` to the hospital's FHIR server.

The ``fhir-delivery`` worker (``crc-medai fhir-delivery``) batches the
resource events that arrive together (at most ``CRC_FHIR_DELIVERY_BATCH_SIZE``,
waiting at most ``CRC_FHIR_DELIVERY_BATCH_WAIT_S``) and POSTs each batch to
``CRC_FHIR_SERVER_URL`` as one transaction Bundle of conditional updates (see
:mod:`consumers.transaction`), so a replayed event updates its earlier copy.

A failed request is retried with exponential backoff: timeouts, connection
errors and HTTP 408, 425, 429 and 5xx up to ``CRC_FHIR_DELIVERY_ATTEMPTS``
attempts. Any other 4xx means the server rejected the content, so it is not
retried. When a Bundle of several resources fails with an HTTP error, each
resource is sent in a Bundle of its own, so that only the failing ones go to
``dlq.fhir-delivery``. When the last attempt reached no server (timeout or
connection error), the whole batch goes there.
The batch handler returns only after every event is delivered or dead-lettered.
Faust acknowledges the events, and so commits their offsets, only after that.

Subscribers that want every resource read ``fhir-resources`` itself,
because this worker publishes no other topic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from consumers.transaction import TransactionError, conditional_url, latest_versions, transaction_bundle
from crc_medai import metrics
from crc_medai.errors import CrcMedAiError
from crc_medai.kafka import dead_letter_headers
from crc_medai.settings import Settings
from schemas.messages import FhirResourceEvent

logger = logging.getLogger(__name__)

SERVICE = "fhir-delivery"
FHIR_JSON = "application/fhir+json"

#: HTTP statuses worth retrying: the server or a proxy may accept the same request later.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

# Characters of a server's error detail kept in an error message.
MAX_DETAIL_CHARS = 500


class DeliveryError(CrcMedAiError):
    """A transaction Bundle was not accepted by the FHIR server."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableDeliveryError(DeliveryError):
    """The request failed in a way that may succeed later (timeout, connection error, 408, 425, 429, 5xx)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class RejectedDeliveryError(DeliveryError):
    """The server rejected the Bundle's content (a 4xx other than 408, 425 and 429), so a retry cannot succeed."""


class DeliveryOffError(CrcMedAiError):
    """The delivery worker was started without a FHIR server URL."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``backoff_s`` doubled after each failure, capped at ``backoff_max_s``."""

    attempts: int
    backoff_s: float
    backoff_max_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.fhir_delivery_attempts, settings.fhir_delivery_backoff_s, settings.fhir_delivery_backoff_max_s
        )

    def delay(self, failures: int, retry_after_s: float | None = None) -> float:
        """Return the seconds to wait after ``failures`` failed attempts.

        A longer Retry-After from the server replaces the backoff, still capped at ``backoff_max_s``.
        """
        delay = min(self.backoff_s * 2 ** (failures - 1), self.backoff_max_s)
        if retry_after_s is not None:
            delay = min(max(delay, retry_after_s), self.backoff_max_s)
        return delay


class FhirServerClient:
    """POSTs transaction Bundles to a FHIR R4 server and checks its transaction-response."""

    def __init__(self, base_url: str, *, token: str = "", timeout_s: float = 10.0) -> None:
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def post_transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST ``bundle`` to the server base and return its transaction-response Bundle.

        Raises:
            RetryableDeliveryError: timeout, connection error, or HTTP 408, 425, 429 or 5xx.
            RejectedDeliveryError: any other non-2xx status, or a 2xx whose body is not a transaction-response.
        """
        try:
            response = await self._http.post(self.base_url, content=json.dumps(bundle).encode("utf-8"))
        except httpx.TimeoutException as exc:
            raise RetryableDeliveryError(f"FHIR server {self.base_url} timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise RetryableDeliveryError(f"FHIR server {self.base_url} not reachable: {exc}") from exc

        if response.status_code in RETRYABLE_STATUSES or response.status_code >= 500:
            raise RetryableDeliveryError(
                _status_message(self.base_url, response),
                status=response.status_code,
                retry_after_s=_retry_after(response),
            )
        if not response.is_success:
            raise RejectedDeliveryError(_status_message(self.base_url, response), status=response.status_code)
        return _transaction_response(self.base_url, response)


def _status_message(base_url: str, response: httpx.Response) -> str:
    return f"FHIR server {base_url} returned HTTP {response.status_code}: {_detail(response)}"


def _detail(response: httpx.Response) -> str:
    """Return the diagnostics of an OperationOutcome body, or the start of any other body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:MAX_DETAIL_CHARS] or "(empty body)"
    issues = body.get("issue") if isinstance(body, dict) else None
    if issues:
        texts = [str(issue.get("diagnostics") or issue.get("code")) for issue in issues if isinstance(issue, dict)]
        return "; ".join(texts)[:MAX_DETAIL_CHARS]
    return json.dumps(body)[:MAX_DETAIL_CHARS]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _transaction_response(base_url: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise RejectedDeliveryError(
            f"FHIR server {base_url} returned HTTP {response.status_code} without JSON; "
            "expected a transaction-response Bundle",
            status=response.status_code,
        ) from exc
    if not isinstance(body, dict) or body.get("type") != "transaction-response":
        raise RejectedDeliveryError(
            f"FHIR server {base_url} returned HTTP {response.status_code} with "
            f"{body.get('resourceType') if isinstance(body, dict) else type(body).__name__} "
            f"type={body.get('type') if isinstance(body, dict) else None}; expected a transaction-response Bundle",
            status=response.status_code,
        )
    return body


Sleep = Callable[[float], Awaitable[None]]


async def send_with_retries(
    client: FhirServerClient, bundle: dict[str, Any], policy: RetryPolicy, *, sleep: Sleep = asyncio.sleep
) -> dict[str, Any]:
    """Send ``bundle`` until it is accepted or the attempts run out; return the transaction-response.

    Raises:
        DeliveryError: the last error, after ``policy.attempts`` retryable failures or one rejection.
    """
    entries = len(bundle["entry"])
    for attempt in range(1, policy.attempts + 1):
        try:
            response = await client.post_transaction(bundle)
        except RetryableDeliveryError as exc:
            metrics.record_fhir_server_request("failed")
            if attempt == policy.attempts:
                raise
            delay = policy.delay(attempt, exc.retry_after_s)
            logger.warning(
                "fhir transaction failed, retrying attempt=%d/%d entries=%d status=%s retry_in_s=%.2f",
                attempt,
                policy.attempts,
                entries,
                exc.status,
                delay,
            )
            await sleep(delay)
        except RejectedDeliveryError:
            metrics.record_fhir_server_request("failed")
            raise
        else:
            metrics.record_fhir_server_request("succeeded")
            return response
    raise AssertionError("unreachable: the last attempt returns or raises")


# --- batches of events --------------------------------------------------------------------------


@dataclass
class Pending:
    """One consumed event on its way to the server: the Kafka event and its parsed message."""

    event: Any  # faust.EventT
    message: FhirResourceEvent


DeadLetter = Callable[[Any, BaseException], Awaitable[None]]


class Delivery:
    """Delivers batches of ``fhir-resources`` events; every event ends delivered or dead-lettered."""

    def __init__(self, client: FhirServerClient, policy: RetryPolicy, dead_letter: DeadLetter) -> None:
        self.client = client
        self.policy = policy
        self.dead_letter = dead_letter

    async def deliver_events(self, events: Sequence[Any]) -> None:
        """Deliver the resources of ``events``; dead-letter those that cannot be parsed or delivered."""
        pending = [item for item in [await self._parse(event) for event in events] if item is not None]
        if pending:
            await self._deliver(pending)

    async def _parse(self, event: Any) -> Pending | None:
        try:
            message = FhirResourceEvent.from_bytes(event.value)
            conditional_url(message.resource)
        except (ValidationError, ValueError, TransactionError, KeyError) as exc:
            await self.dead_letter(event, exc)
            return None
        return Pending(event, message)

    async def _deliver(self, pending: list[Pending]) -> None:
        resources = latest_versions([item.message.resource for item in pending])
        try:
            await send_with_retries(
                self.client, transaction_bundle(resources, base_url=self.client.base_url), self.policy
            )
        except (DeliveryError, TransactionError) as exc:
            await self._deliver_one_by_one(pending, resources, exc)
            return

        metrics.record_fhir_server_delivery("succeeded", len(resources))
        for item in pending:
            metrics.record_processed(SERVICE, item.event.message.topic)
        logger.info("fhir transaction delivered resources=%d events=%d", len(resources), len(pending))

    async def _deliver_one_by_one(
        self, pending: list[Pending], resources: list[dict[str, Any]], error: Exception
    ) -> None:
        # Splitting isolates a resource the server fails on. It cannot help when no request reached
        # the server (timeout or connection error on the last attempt), so the batch is dead-lettered whole.
        unreachable = isinstance(error, RetryableDeliveryError) and error.status is None
        if len(resources) == 1 or unreachable:
            await self._fail(pending, len(resources), error)
            return

        logger.warning(
            "fhir transaction of %d resources failed, sending them one by one error_type=%s status=%s",
            len(resources),
            type(error).__name__,
            getattr(error, "status", None),
        )
        for resource in resources:
            # Older versions of a resource in the batch share its fate: the latest version replaces them.
            group = [item for item in pending if _same_resource(item.message.resource, resource)]
            await self._deliver(group)

    async def _fail(self, pending: list[Pending], resources: int, error: Exception) -> None:
        logger.error(
            "fhir delivery failed, dead-lettering resources=%d events=%d error_type=%s status=%s",
            resources,
            len(pending),
            type(error).__name__,
            getattr(error, "status", None),
        )
        metrics.record_fhir_server_delivery("failed", resources)
        for item in pending:
            await self.dead_letter(item.event, error)


def _same_resource(left: dict[str, Any], right: dict[str, Any]) -> bool:
    if (left.get("resourceType"), left.get("id")) == (right.get("resourceType"), right.get("id")):
        return True
    return conditional_url(left) == conditional_url(right)


# --- the worker ---------------------------------------------------------------------------------


def build_app(settings: Settings):  # noqa: ANN201 - returns faust.App
    """Build the delivery worker's Faust app: one agent that sends ``fhir-resources`` to the FHIR server.

    Raises:
        DeliveryOffError: when ``CRC_FHIR_SERVER_URL`` is empty.
    """
    from processors.app import create_app, raw_topic

    _require_server_url(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # httpx logs every request at INFO
    app = create_app(settings, SERVICE)
    resources = raw_topic(app, settings, FhirResourceEvent.topic)
    dead_letter_topic = raw_topic(app, settings, f"dlq.{SERVICE}")
    client = FhirServerClient(
        settings.fhir_server_url,
        token=settings.fhir_server_token.get_secret_value(),
        timeout_s=settings.fhir_delivery_timeout_s,
    )

    async def dead_letter(event: Any, error: BaseException) -> None:
        message = event.message
        logger.warning(
            "record dead-lettered service=%s topic=%s partition=%s offset=%s error_type=%s",
            SERVICE,
            message.topic,
            message.partition,
            message.offset,
            type(error).__name__,
        )
        metrics.record_dead_letter(SERVICE, message.topic)
        await dead_letter_topic.send(
            key=event.key,
            value=event.value,
            headers=dead_letter_headers(
                service=SERVICE, error=error, topic=message.topic, partition=message.partition, offset=message.offset
            ),
        )

    delivery = Delivery(client, RetryPolicy.from_settings(settings), dead_letter)
    logger.info(
        "fhir delivery ready server=%s batch_size=%d attempts=%d",
        client.base_url,
        settings.fhir_delivery_batch_size,
        settings.fhir_delivery_attempts,
    )

    @app.agent(resources)
    async def deliver_resources(stream) -> None:  # noqa: ANN001 - faust stream
        metrics.declare_topics(SERVICE, (settings.topic(FhirResourceEvent.topic),))
        metrics.declare_fhir_server_outcomes()
        batches = stream.take_events(settings.fhir_delivery_batch_size, within=settings.fhir_delivery_batch_wait_s)
        async for events in batches:
            await delivery.deliver_events(events)

    @app.on_before_shutdown.connect
    async def close_client(app_: object, **_: object) -> None:
        await client.aclose()

    return app


def _require_server_url(settings: Settings) -> None:
    if not settings.fhir_server_url:
        raise DeliveryOffError(
            "FHIR delivery is off: CRC_FHIR_SERVER_URL is empty; set it to the FHIR server's base URL to deliver"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``crc-medai fhir-delivery``: run the delivery worker until stopped."""
    from crc_medai.cli import run_service
    from crc_medai.kafka import ensure_topics
    from crc_medai.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="crc-medai fhir-delivery",
        description=(
            "Run the delivery worker (a Faust worker) until stopped: it sends fhir-resources to the FHIR server "
            "at CRC_FHIR_SERVER_URL as transaction Bundles of conditional updates. The other settings come from "
            "CRC_* environment variables (see crc_medai/settings.py)."
        ),
    )
    parser.parse_args(argv)
    settings = get_settings()
    _require_server_url(settings)
    asyncio.run(ensure_topics(settings, [FhirResourceEvent.topic, f"dlq.{SERVICE}"]))
    return run_service(SERVICE)
