"""Tests of the what-if HTTP API through FastAPI's TestClient."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from processors.prognosis.api import EXAMPLE_FEATURES, create_app
from processors.prognosis.survival_model import RecurrenceSurvivalModel

RECORDS = Path(__file__).resolve().parent.parent / "samples" / "records"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(RecurrenceSurvivalModel.load(), RECORDS)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return json.loads((RECORDS / "pt-0003.json").read_text())


def only_error(response: Any) -> dict[str, Any]:
    details = response.json()["detail"]
    assert len(details) == 1
    return details[0]


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "model": {"name": "crc-recurrence-survival-catboost", "version": "2.0.0"},
    }


def test_openapi_documents_what_if(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()

    assert "/what-if" in schema["paths"]
    operation = schema["paths"]["/what-if"]["post"]
    assert operation["summary"]
    assert "WhatIfRequest" in schema["components"]["schemas"]
    assert "WhatIfResult" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_what_if_by_patient_id(client: TestClient) -> None:
    response = client.post("/what-if", json={"patient_id": "pt-0001", "changes": {"nodes": 6, "rx": "Obs"}})

    assert response.status_code == 200
    body = response.json()
    assert body["patient_id"] == "pt-0001"
    assert [item["horizon_years"] for item in body["probability_changes"]] == [3.0, 5.0]
    assert body["probability_changes"][1]["change"] > 0
    assert {item["feature"] for item in body["changes"]} == {"rx", "nodes", "node4"}
    assert body["contribution_changes"]
    assert body["decision_path_after"]["steps"]
    assert body["summary"][0].startswith("Changed: ")


def test_what_if_by_features(client: TestClient) -> None:
    response = client.post("/what-if", json={"features": EXAMPLE_FEATURES, "changes": {"rx": "Lev+5FU"}})

    assert response.status_code == 200
    body = response.json()
    assert body["patient_id"] is None
    assert body["probability_changes"][1]["change"] < 0
    assert body["before"]["missing_features"] == []


def test_what_if_by_bundle(client: TestClient, bundle: dict[str, Any]) -> None:
    by_bundle = client.post("/what-if", json={"bundle": bundle, "changes": {"adhere": 1}})
    by_id = client.post("/what-if", json={"patient_id": "pt-0003", "changes": {"adhere": 1}})

    assert by_bundle.status_code == 200
    assert by_bundle.json()["after"] == by_id.json()["after"]


def test_what_if_keeps_missing_reported(client: TestClient) -> None:
    response = client.post("/what-if", json={"patient_id": "pt-0006", "changes": {"age": 70}})

    assert response.status_code == 200
    assert response.json()["after"]["missing_features"] == ["nodes"]


@pytest.mark.parametrize(
    ("changes", "feature", "fragment"),
    [
        ({"nodes": 101}, "nodes", "nodes=101 is outside the clinical range; expected a number from 0 to 100 nodes"),
        ({"age": 150}, "age", "age=150 is outside the clinical range; expected a number from 0 to 120 years"),
        ({"extent": 0}, "extent", "extent=0 is invalid; expected one of 1 (submucosa (T1))"),
        ({"rx": "FOLFOX"}, "rx", "rx='FOLFOX' is invalid; expected one of 'Obs' (observation only)"),
        ({"nodes": "six"}, "nodes", "nodes='six' is invalid"),
        ({"sex": None}, "sex", "required features ['sex'] are missing"),
    ],
)
def test_invalid_change_is_422_naming_the_value(
    client: TestClient, changes: dict[str, Any], feature: str, fragment: str
) -> None:
    response = client.post("/what-if", json={"patient_id": "pt-0001", "changes": changes})

    assert response.status_code == 422
    error = only_error(response)
    assert error["type"] == "clinical_value"
    assert error["loc"] == ["body", "changes", feature]
    assert fragment in error["msg"]
    assert error["input"] == changes[feature]
    assert error["ctx"]["feature"] == feature


def test_unknown_feature_is_422(client: TestClient) -> None:
    response = client.post("/what-if", json={"patient_id": "pt-0001", "changes": {"tumour_size": 3}})

    assert response.status_code == 422
    error = only_error(response)
    assert error["loc"] == ["body", "changes", "tumour_size"]
    assert "unknown feature 'tumour_size'" in error["msg"]
    assert "ctx" not in error


def test_invalid_recorded_feature_is_422(client: TestClient) -> None:
    features = {**EXAMPLE_FEATURES, "differ": 7}
    response = client.post("/what-if", json={"features": features, "changes": {"rx": "Obs"}})

    assert response.status_code == 422
    error = only_error(response)
    assert error["loc"] == ["body", "features", "differ"]
    assert "differ=7" in error["msg"]


def test_contradicting_node4_is_422(client: TestClient) -> None:
    response = client.post("/what-if", json={"patient_id": "pt-0001", "changes": {"nodes": 8, "node4": 0}})

    assert response.status_code == 422
    assert "contradicts nodes=8" in only_error(response)["msg"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"changes": {"nodes": 3}}, "give exactly one of patient_id, features or bundle; got none"),
        (
            {"patient_id": "pt-0001", "features": EXAMPLE_FEATURES, "changes": {"nodes": 3}},
            "got ['patient_id', 'features']",
        ),
        ({"patient_id": "pt-0001", "changes": {}}, "at least 1 item"),
        ({"patient_id": "../secret", "changes": {"nodes": 3}}, "String should match pattern"),
    ],
)
def test_malformed_request_is_422(client: TestClient, body: dict[str, Any], fragment: str) -> None:
    response = client.post("/what-if", json=body)

    assert response.status_code == 422
    assert fragment in json.dumps(response.json()["detail"])


def test_unknown_patient_is_404(client: TestClient) -> None:
    response = client.post("/what-if", json={"patient_id": "pt-9999", "changes": {"nodes": 3}})

    assert response.status_code == 404
    assert response.json() == {"detail": "no record for patient_id 'pt-9999' in records/"}


def test_invalid_bundle_is_422(client: TestClient, bundle: dict[str, Any]) -> None:
    broken = copy.deepcopy(bundle)
    broken["entry"][0]["resource"]["birthDate"] = "12.03.1950"
    response = client.post("/what-if", json={"bundle": broken, "changes": {"nodes": 3}})

    assert response.status_code == 422
    error = only_error(response)
    assert error["type"] == "invalid_bundle"
    assert error["loc"] == ["body", "bundle"]
    assert "birthDate" in error["msg"]
