"""HTTP API of the what-if simulator (FastAPI; OpenAPI docs at ``/docs``).

Start it on loopback::

    python -m processors.prognosis.api --host 127.0.0.1 --port 8010

``POST /what-if`` takes one patient (a record id, feature values or a FHIR
Bundle) and the changed values, and returns the risk before and after.
An invalid value gets HTTP 422 in FastAPI's validation error shape, with
``loc`` pointing at the value and ``msg`` naming the feature, the value and
the allowed range. An unknown record id gets 404.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from crc_medai.logs import pseudonym
from processors.prognosis.data import FEATURES
from processors.prognosis.errors import FeatureValueError, InvalidBundleError, RecordNotFoundError
from processors.prognosis.fhir_mapping import PSEUDONYM_PATTERN, features_from_bundle
from processors.prognosis.survival_model import DEFAULT_WEIGHTS, RecurrenceSurvivalModel
from processors.prognosis.whatif import DEFAULT_RECORDS_DIR, WhatIfResult, read_bundle_record, record_path, simulate
from schemas.messages import ModelRef

logger = logging.getLogger(__name__)

RequestValue = int | float | str | None

EXAMPLE_FEATURES: dict[str, RequestValue] = {
    "rx": "Lev",
    "sex": 1,
    "age": 62,
    "obstruct": 0,
    "perfor": 0,
    "adhere": 0,
    "nodes": 3,
    "differ": 2,
    "extent": 3,
    "surg": 0,
}


class WhatIfRequest(BaseModel):
    """A patient, given in exactly one of three ways, and the values to change."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"patient_id": "pt-0001", "changes": {"nodes": 6, "rx": "Obs"}},
                {"features": EXAMPLE_FEATURES, "changes": {"rx": "Lev+5FU"}},
            ]
        },
    )

    patient_id: str | None = Field(
        default=None,
        pattern=PSEUDONYM_PATTERN.pattern,
        description="Pseudonym of a stored record, for example 'pt-0001'.",
    )
    features: dict[str, RequestValue] | None = Field(
        default=None, description="Feature values by name (see FEATURES.md); null or absent is missing."
    )
    bundle: dict[str, Any] | None = Field(default=None, description="A FHIR R4 collection Bundle for one patient.")
    changes: dict[str, RequestValue] = Field(
        min_length=1,
        description='New values by feature name, for example {"nodes": 6, "rx": "Obs"}; null makes it missing.',
    )

    @model_validator(mode="after")
    def _one_patient_source(self) -> WhatIfRequest:
        given = [name for name in ("patient_id", "features", "bundle") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of patient_id, features or bundle; got {given or 'none'}")
        return self


class Health(BaseModel):
    """Liveness status and the loaded model."""

    status: str
    model: ModelRef


def create_app(model: RecurrenceSurvivalModel | None = None, records_dir: Path = DEFAULT_RECORDS_DIR) -> FastAPI:
    """Build the what-if API around a loaded model and a folder of ``<patient_id>.json`` Bundles."""
    model = model or RecurrenceSurvivalModel.load(DEFAULT_WEIGHTS)
    app = FastAPI(
        title="CRC-MedAI recurrence what-if simulator",
        version=model.version,
        description=(
            "Recurrence risk of resected colon cancer within 3 and 5 years, and how it changes when feature "
            "values change. Demonstration model trained on a 1980s trial: not for clinical use."
        ),
    )

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """Report that the service is up and which model it serves."""
        return Health(status="ok", model=model.model_ref)

    @app.post(
        "/what-if",
        response_model=WhatIfResult,
        responses={404: {"description": "No record with this patient_id."}},
    )
    def what_if(request: WhatIfRequest) -> WhatIfResult | JSONResponse:
        """Return the patient's risk as recorded and with the changed values, and what moved."""
        try:
            patient_id, features, missing = _patient_record(request, records_dir)
            return simulate(model, features, request.changes, missing, patient_id=patient_id)
        except RecordNotFoundError as error:
            logger.info("what-if rejected status=404 patient=%s", _log_id(request))
            return JSONResponse(status_code=404, content={"detail": str(error)})
        except FeatureValueError as error:
            logger.info("what-if rejected status=422 patient=%s feature=%s", _log_id(request), error.feature)
            return _value_error(request, error)
        except InvalidBundleError as error:
            logger.info("what-if rejected status=422 patient=%s element=%s", _log_id(request), error.element_path)
            return _bundle_error(request, error)

    logger.info("what-if api ready model=%s version=%s records_dir=%s", model.name, model.version, records_dir)
    return app


def _log_id(request: WhatIfRequest) -> str:
    """Return a hash of the record id for logs, never the id itself."""
    return pseudonym(request.patient_id) if request.patient_id is not None else "-"


def _patient_record(
    request: WhatIfRequest, records_dir: Path
) -> tuple[str | None, dict[str, RequestValue], dict[str, str]]:
    """Return the patient id, feature values and reasons for missing values from the request."""
    if request.features is not None:
        return None, dict(request.features), {}
    if request.patient_id is not None:
        record = read_bundle_record(record_path(request.patient_id, records_dir))
    else:
        record = features_from_bundle(request.bundle)
    return record.patient_id, record.features, record.missing


def _value_error(request: WhatIfRequest, error: FeatureValueError) -> JSONResponse:
    """Return HTTP 422 for an invalid value, with ``loc`` pointing at where the request gave it."""
    if error.feature in request.changes:
        location, value = ["body", "changes", error.feature], request.changes[error.feature]
    elif request.features is not None:
        location, value = ["body", "features", error.feature], request.features.get(error.feature)
    else:
        source = "patient_id" if request.patient_id is not None else "bundle"
        location, value = ["body", source], None
    detail: dict[str, Any] = {"type": "clinical_value", "loc": location, "msg": str(error), "input": value}
    if error.feature in FEATURES:
        detail["ctx"] = {"feature": error.feature, "allowed": FEATURES[error.feature].allowed_text()}
    return JSONResponse(status_code=422, content={"detail": [detail]})


def _bundle_error(request: WhatIfRequest, error: InvalidBundleError) -> JSONResponse:
    source = "bundle" if request.bundle is not None else "patient_id"
    detail = {"type": "invalid_bundle", "loc": ["body", source], "msg": str(error), "input": error.element_path}
    return JSONResponse(status_code=422, content={"detail": [detail]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the recurrence what-if simulator over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8010, help="TCP port to listen on")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="the survival model's .cbm weights")
    parser.add_argument("--records-dir", type=Path, default=DEFAULT_RECORDS_DIR, help="folder of <id>.json Bundles")
    args = parser.parse_args(argv)

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(RecurrenceSurvivalModel.load(args.weights), args.records_dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
