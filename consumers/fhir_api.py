"""FHIR R4 read API over the Redis view (FastAPI), ``crc-medai fhir-api``.

Read (``GET /[type]/[id]``) and search (``GET /[type]?...``) for Observation,
RiskAssessment, DiagnosticReport, Media (the Grad-CAM heatmaps) and Device, and the CapabilityStatement at
``GET /metadata``. Errors are OperationOutcome resources: 400 for a bad
request, 401 for a missing or unknown token, 403 for a token without the
scope, 404 for an unknown id, 503 when Redis is unreachable.

Authentication: ``Authorization: Bearer <token>``, where each token and its
scopes come from ``CRC_FHIR_API_TOKENS``, a JSON object such as
``{"token-1": "system/Observation.read system/Device.read"}``. Scopes follow
SMART App Launch: v1 ``[context]/[type|*].[read|write|*]`` and v2
``[context]/[type|*].[c][r][u][d][s]``. A read needs ``read``, ``*`` or ``r``
and a search needs ``read``, ``*`` or ``s``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import redis
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from consumers.view import (
    RESOURCE_TYPES,
    SEARCH_PARAMETERS,
    FhirView,
    SearchParameterError,
    parse_search,
    view_keys,
)
from crc_medai.errors import CrcMedAiError
from crc_medai.settings import Settings

logger = logging.getLogger(__name__)

FHIR_VERSION = "4.0.1"
FHIR_JSON = "application/fhir+json"

#: Resources per search page when the request gives no ``_count``.
DEFAULT_COUNT = 20
#: Maximum resources per search page; a larger ``_count`` is capped to it.
MAX_COUNT = 100

#: A FHIR R4 logical id: 1 to 64 letters, digits, ``-`` and ``.``.
FHIR_ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"

DEFAULT_PORT = 8030

Interaction = Literal["read", "search"]


class TokenConfigError(CrcMedAiError):
    """``CRC_FHIR_API_TOKENS`` is not a JSON object of token -> scopes, or a scope is malformed."""


class FhirHttpError(CrcMedAiError):
    """An error the API returns as an OperationOutcome with an HTTP status."""

    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.headers = headers or {}


# --- scopes and tokens --------------------------------------------------------------------------

_SCOPE_PATTERN = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>[A-Za-z]+|\*)\.(?P<access>read|write|\*|c?r?u?d?s?)$"
)


@dataclass(frozen=True)
class Scope:
    """One SMART scope such as ``system/Observation.read`` or ``user/*.rs``."""

    context: str
    resource_type: str
    access: str

    @classmethod
    def parse(cls, text: str) -> Scope:
        match = _SCOPE_PATTERN.match(text)
        if match is None or not match["access"]:
            raise TokenConfigError(
                f"scope {text!r} is not a SMART scope; write [patient|user|system]/[type|*].[read|write|*] "
                "or a SMART v2 access such as .rs"
            )
        return cls(match["context"], match["type"], match["access"])

    def grants(self, resource_type: str, interaction: Interaction) -> bool:
        """Tell whether this scope allows ``interaction`` on ``resource_type``.

        NOTE: ``patient/`` scopes need a patient in the launch context, which
        static tokens do not carry, so they grant nothing here. ``user/`` scopes
        grant what ``system/`` scopes do, because the view has no per-user access rules.
        """
        if self.context == "patient" or self.resource_type not in ("*", resource_type):
            return False
        if self.access in ("read", "*"):
            return True
        if self.access == "write":
            return False
        return ("r" if interaction == "read" else "s") in self.access


def parse_tokens(config: str) -> dict[str, tuple[Scope, ...]]:
    """Parse ``CRC_FHIR_API_TOKENS`` into SHA-256 digest of each token -> its scopes.

    The map keeps only digests, so neither it nor a log line of it contains a token.

    Raises:
        TokenConfigError: when ``config`` is not a JSON object of non-empty strings or a scope is malformed.
    """
    if not config.strip():
        return {}
    try:
        raw = json.loads(config)
    except json.JSONDecodeError as exc:
        raise TokenConfigError(f"CRC_FHIR_API_TOKENS is not valid JSON ({exc.msg} at char {exc.pos})") from exc
    if not isinstance(raw, dict):
        raise TokenConfigError(
            f"CRC_FHIR_API_TOKENS must be a JSON object of token -> space-separated scopes; got {type(raw).__name__}"
        )

    tokens = {}
    for index, (token, scopes) in enumerate(raw.items()):
        if not token or not isinstance(scopes, str) or not scopes.split():
            # The token itself is a secret, so the message names only its position.
            raise TokenConfigError(f"CRC_FHIR_API_TOKENS entry {index + 1} needs a non-empty token and scope string")
        tokens[token_digest(token)] = tuple(Scope.parse(scope) for scope in scopes.split())
    return tokens


def token_digest(token: str) -> str:
    """Return the SHA-256 hex digest under which a token is looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authorizer:
    """Checks bearer tokens and their scopes."""

    def __init__(self, tokens: dict[str, tuple[Scope, ...]]) -> None:
        self.tokens = tokens

    def require(
        self, credentials: HTTPAuthorizationCredentials | None, resource_type: str, interaction: Interaction
    ) -> None:
        """Return when the credentials grant ``interaction`` on ``resource_type``; raise a 401 or 403 otherwise."""
        needed = f"system/{resource_type}.read"
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise FhirHttpError(
                401,
                "login",
                "missing bearer token; send Authorization: Bearer <token>",
                {"WWW-Authenticate": 'Bearer realm="crc-medai"'},
            )
        scopes = self.tokens.get(token_digest(credentials.credentials))
        if scopes is None:
            raise FhirHttpError(
                401,
                "login",
                "invalid bearer token; use a token configured in CRC_FHIR_API_TOKENS",
                {"WWW-Authenticate": 'Bearer realm="crc-medai", error="invalid_token"'},
            )
        if not any(scope.grants(resource_type, interaction) for scope in scopes):
            raise FhirHttpError(
                403,
                "forbidden",
                f"the token has no scope that allows {interaction} on {resource_type}; it needs for example {needed}",
                {"WWW-Authenticate": f'Bearer realm="crc-medai", error="insufficient_scope", scope="{needed}"'},
            )


# --- response bodies ----------------------------------------------------------------------------


class FhirJSONResponse(JSONResponse):
    """A FHIR resource as ``application/fhir+json``."""

    media_type = FHIR_JSON


class OperationOutcomeIssue(BaseModel):
    """One issue of an OperationOutcome."""

    severity: Literal["fatal", "error", "warning", "information"]
    code: str
    diagnostics: str | None = None


class OperationOutcomeBody(BaseModel):
    """The OperationOutcome every error returns (documentation model for the OpenAPI schema)."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["OperationOutcome"]  # noqa: N815 - FHIR element name
    issue: list[OperationOutcomeIssue] = Field(min_length=1)


class ResourceBody(BaseModel):
    """A FHIR resource (documentation model; the full structure is the R4 resource)."""

    model_config = ConfigDict(extra="allow")

    resourceType: str  # noqa: N815 - FHIR element name
    id: str


class CapabilityStatementBody(BaseModel):
    """The server's CapabilityStatement (documentation model)."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["CapabilityStatement"]  # noqa: N815 - FHIR element name
    fhirVersion: str  # noqa: N815 - FHIR element name
    rest: list[dict[str, Any]]


class BundleLink(BaseModel):
    relation: str
    url: str


class BundleEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    fullUrl: str  # noqa: N815 - FHIR element name
    resource: ResourceBody


class SearchsetBundleBody(BaseModel):
    """A searchset Bundle: one page of matches, ``total`` over all pages, ``next`` when there are more."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["Bundle"]  # noqa: N815 - FHIR element name
    type: Literal["searchset"]
    total: int = Field(ge=0)
    link: list[BundleLink]
    entry: list[BundleEntry] = Field(default_factory=list)


def operation_outcome(status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Build an OperationOutcome error response."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return FhirJSONResponse(body, status_code=status, headers=headers)


_ERRORS = {
    400: {"model": OperationOutcomeBody, "description": "Bad request: unknown search parameter or invalid value"},
    401: {"model": OperationOutcomeBody, "description": "Missing or invalid bearer token"},
    403: {"model": OperationOutcomeBody, "description": "The token lacks the scope for this request"},
    503: {"model": OperationOutcomeBody, "description": "The view in Redis is not reachable"},
}


# --- search and paging --------------------------------------------------------------------------


def page_parameters(parameters: list[tuple[str, str]]) -> tuple[int, int]:
    """Return (count, offset) from ``_count`` and ``_offset``; ``_count`` above :data:`MAX_COUNT` is capped."""
    values = {"_count": DEFAULT_COUNT, "_offset": 0}
    for name, value in parameters:
        if name in values:
            if not value.isdigit():
                raise FhirHttpError(400, "invalid", f"{name}={value!r} is not a whole number >= 0")
            values[name] = int(value)
    formats = [value for name, value in parameters if name == "_format"]
    if any(value not in ("json", FHIR_JSON, "application/json") for value in formats):
        raise FhirHttpError(400, "not-supported", f"_format={formats[0]!r} is not served; this server returns json")
    return min(values["_count"], MAX_COUNT), values["_offset"]


def searchset(
    request: Request, resources: list[dict[str, Any]], parameters: list[tuple[str, str]], count: int, offset: int
) -> dict[str, Any]:
    """Build the searchset Bundle of one page, with self, first, previous and next links."""
    page = resources[offset : offset + count]
    links = [{"relation": "self", "url": _page_url(request, parameters, count, offset)}]
    links.append({"relation": "first", "url": _page_url(request, parameters, count, 0)})
    if offset > 0:
        links.append({"relation": "previous", "url": _page_url(request, parameters, count, max(offset - count, 0))})
    if count > 0 and offset + count < len(resources):
        links.append({"relation": "next", "url": _page_url(request, parameters, count, offset + count)})

    base = str(request.base_url).rstrip("/")
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": datetime.now(UTC).isoformat(),
        "total": len(resources),
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
                "resource": resource,
                "search": {"mode": "match"},
            }
            for resource in page
        ],
    }


def _page_url(request: Request, parameters: list[tuple[str, str]], count: int, offset: int) -> str:
    kept = [(name, value) for name, value in parameters if name not in ("_count", "_offset")]
    query = [*kept, ("_count", str(count)), ("_offset", str(offset))]
    return str(request.url.replace(query=urlencode(query, safe="|:/,")))


# --- CapabilityStatement ------------------------------------------------------------------------


def capability_statement(base_url: str, started: datetime) -> dict[str, Any]:
    """Build the CapabilityStatement: read and search-type for each resource type, with its search parameters."""
    resources = [
        {
            "type": resource_type,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": "_id", "type": "token", "documentation": "Logical id of the resource"},
                *(
                    {"name": parameter.name, "type": parameter.type, "documentation": parameter.description}
                    for parameter in SEARCH_PARAMETERS[resource_type].values()
                ),
            ],
        }
        for resource_type in RESOURCE_TYPES
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": started.isoformat(),
        "publisher": "CRC-MedAI",
        "kind": "instance",
        "software": {"name": "CRC-MedAI FHIR read API"},
        "implementation": {"description": "Read-only FHIR view of CRC-MedAI results", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "OAuth",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer tokens (RFC 6750) configured on the server, each with SMART scopes such "
                    "as system/Observation.read or system/*.rs; patient/ scopes are not supported.",
                },
                "resource": resources,
            }
        ],
    }


# --- the application ----------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="A token configured in CRC_FHIR_API_TOKENS")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
ResourceId = Annotated[str, Path(pattern=FHIR_ID_PATTERN, description="Logical id of the resource")]


def create_app(settings: Settings, client: redis.Redis | None = None) -> FastAPI:
    """Create the FHIR read API over the view of ``settings``.

    Raises:
        TokenConfigError: when ``CRC_FHIR_API_TOKENS`` cannot be parsed.
    """
    authorizer = Authorizer(parse_tokens(settings.fhir_api_tokens.get_secret_value()))
    if not authorizer.tokens:
        logger.warning("no tokens configured: every request except /metadata is rejected; set CRC_FHIR_API_TOKENS")
    view = FhirView(client or redis.Redis.from_url(settings.redis_url), view_keys(settings))
    started = datetime.now(UTC)

    app = FastAPI(
        title="CRC-MedAI FHIR read API",
        version=FHIR_VERSION,
        description=("Read and search FHIR R4 results (Observation, RiskAssessment, DiagnosticReport, Media, Device)."),
    )
    _add_error_handlers(app)

    @app.get(
        "/metadata", response_class=FhirJSONResponse, responses={200: {"model": CapabilityStatementBody}}, tags=["FHIR"]
    )
    def metadata(request: Request) -> FhirJSONResponse:
        """Return the server's CapabilityStatement (no token needed)."""
        return FhirJSONResponse(capability_statement(str(request.base_url).rstrip("/"), started))

    for resource_type in RESOURCE_TYPES:
        _add_resource_routes(app, resource_type, view, authorizer)
    return app


def _add_resource_routes(app: FastAPI, resource_type: str, view: FhirView, authorizer: Authorizer) -> None:
    def read(resource_id: ResourceId, credentials: Credentials) -> FhirJSONResponse:
        authorizer.require(credentials, resource_type, "read")
        resource = view.read(resource_type, resource_id)
        if resource is None:
            raise FhirHttpError(404, "not-found", f"{resource_type}/{resource_id} not found")
        return FhirJSONResponse(resource)

    def search(request: Request, credentials: Credentials) -> FhirJSONResponse:
        authorizer.require(credentials, resource_type, "search")
        parameters = request.query_params.multi_items()
        count, offset = page_parameters(parameters)
        try:
            query = parse_search(resource_type, parameters)
        except SearchParameterError as exc:
            raise FhirHttpError(400, "invalid", str(exc)) from exc
        return FhirJSONResponse(searchset(request, view.search(query), parameters, count, offset))

    app.add_api_route(
        f"/{resource_type}/{{resource_id}}",
        read,
        methods=["GET"],
        name=f"read_{resource_type}",
        summary=f"Read a {resource_type} by id",
        response_class=FhirJSONResponse,
        responses={200: {"model": ResourceBody}, 404: {"model": OperationOutcomeBody}, **_ERRORS},
        tags=[resource_type],
    )
    app.add_api_route(
        f"/{resource_type}",
        search,
        methods=["GET"],
        name=f"search_{resource_type}",
        summary=f"Search {resource_type} resources",
        response_class=FhirJSONResponse,
        responses={200: {"model": SearchsetBundleBody}, **_ERRORS},
        openapi_extra={"parameters": _search_parameter_docs(resource_type)},
        tags=[resource_type],
    )


def _search_parameter_docs(resource_type: str) -> list[dict[str, Any]]:
    documented = [
        {"name": "_id", "in": "query", "required": False, "schema": {"type": "string"}, "description": "Logical ids"},
        {
            "name": "_count",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": f"Resources per page (default {DEFAULT_COUNT}, at most {MAX_COUNT})",
        },
        {
            "name": "_offset",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Matches to skip, as in the next links",
        },
    ]
    for parameter in SEARCH_PARAMETERS[resource_type].values():
        description = parameter.description + (
            "; prefixes eq, ne, gt, lt, ge, le, sa, eb" if parameter.type == "date" else ""
        )
        documented.append(
            {
                "name": parameter.name,
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": description + "; comma-separated values match any",
            }
        )
    return documented


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FhirHttpError)
    async def fhir_error(request: Request, exc: FhirHttpError) -> JSONResponse:
        logger.info("fhir request rejected path=%s status=%d code=%s", request.url.path, exc.status, exc.code)
        return operation_outcome(exc.status, exc.code, exc.diagnostics, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        return operation_outcome(400, "invalid", f"invalid request at {where}: {error.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "exception")
        detail = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return operation_outcome(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(redis.RedisError)
    async def view_unreachable(request: Request, exc: redis.RedisError) -> JSONResponse:
        logger.error("fhir view unreachable path=%s error=%s", request.url.path, exc)
        return operation_outcome(503, "transient", "the FHIR view (Redis) is not reachable; retry later")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``crc-medai fhir-api``: serve the FHIR read API with uvicorn."""
    import uvicorn

    from crc_medai.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="crc-medai fhir-api",
        description=(
            "Serve the FHIR R4 read API (read, search, /metadata) over the FHIR view in Redis. Bearer tokens and "
            "their SMART scopes come from CRC_FHIR_API_TOKENS; the other settings from CRC_* environment "
            "variables (see crc_medai/settings.py), for example CRC_REDIS_URL."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port to listen on (default {DEFAULT_PORT})"
    )
    args = parser.parse_args(argv)

    settings = get_settings()
    app = create_app(settings)
    logger.info("fhir api starting host=%s port=%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
