"""Sample FHIR Bundles built from real trial rows, for the demo and the tests.

Run through ``python -m processors.prognosis.fhir_mapping --out samples/records --count 6``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from processors.prognosis.data import load_recurrence_table
from processors.prognosis.fhir_mapping import bundle_from_trial_row, features_from_bundle
from processors.prognosis.model import RecurrenceModel

INVALID_BUNDLE_NAME = "invalid-bundle.json"


def select_sample_rows(table: pd.DataFrame, probability: np.ndarray, count: int) -> list[int]:
    """Pick ``count`` row positions: ``count - 1`` across the risk range, then one with nodes missing.

    The complete rows are sorted by predicted probability (ties by trial id)
    and picked at evenly spaced quantiles from 2 % to 98 %. The last pick is
    the median-risk row among those whose node count is missing but whose
    grade is known.
    """
    if count < 2:
        raise ValueError(f"count={count} is too small; at least 2 rows are needed to include a missing value")

    ranked = table.assign(probability=probability, position=np.arange(len(table)))
    complete = ranked[ranked["nodes"].notna() & ranked["differ"].notna()].sort_values(["probability", "id"])
    quantiles = np.linspace(0.02, 0.98, count - 1)
    picks = [int(complete["position"].iloc[round(q * (len(complete) - 1))]) for q in quantiles]

    nodes_missing = ranked[ranked["nodes"].isna() & ranked["differ"].notna()].sort_values(["probability", "id"])
    picks.append(int(nodes_missing["position"].iloc[len(nodes_missing) // 2]))
    return picks


def invalid_bundle(valid: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a valid Bundle whose Patient.birthDate is written DD.MM.YYYY, which FHIR rejects.

    The fhir.resources schema rejects this, so every validator in the pipeline
    does. An invalid code such as gender 'unknown-value' would pass
    fhir.resources, which does not check value set bindings.
    """
    broken = copy.deepcopy(dict(valid))
    broken["id"] = "invalid-record"
    patient = broken["entry"][0]["resource"]
    year, month, day = patient["birthDate"].split("-")
    patient["birthDate"] = f"{day}.{month}.{year}"
    return broken


def write_samples(out: Path, count: int, model_path: Path) -> list[Path]:
    """Write ``count`` sample Bundles ``pt-0001.json`` upwards plus ``invalid-bundle.json``; no trial id is written."""
    table = load_recurrence_table()
    model = RecurrenceModel.load(model_path)
    rows = select_sample_rows(table, model.predict_table(table), count)

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for number, row_index in enumerate(rows, start=1):
        pseudonym = f"pt-{number:04d}"
        bundle = bundle_from_trial_row(table.iloc[row_index], pseudonym)
        written.append(_write_json(out / f"{pseudonym}.json", bundle))

        prediction = model.predict(features_from_bundle(bundle).features)
        print(
            f"{pseudonym}: {prediction.risk_group} risk, probability {prediction.probability:.2f}, "
            f"missing {prediction.missing_features}"
        )

    invalid = invalid_bundle(bundle_from_trial_row(table.iloc[rows[0]], "pt-invalid"))
    written.append(_write_json(out / INVALID_BUNDLE_NAME, invalid))
    return written


def _write_json(path: Path, document: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
