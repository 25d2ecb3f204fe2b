"""A shallow decision tree that mimics the model, read out as a decision path a clinician can follow.

The tree is a global surrogate (Craven and Shavlik, "Extracting tree-structured
representations of trained networks", NIPS 1995): a scikit-learn
``DecisionTreeRegressor`` fitted to the model's own predicted 5-year
probability on the training patients, not to the outcomes. Its fidelity is
the share of the model's variance it reproduces (R^2): the higher it is, the
more the path can be trusted as a summary of the model. The path explains the surrogate, and
the SHAP contributions explain the model itself.

The fitted tree is stored as plain JSON in the model's metadata sidecar, so
reading a path needs neither scikit-learn nor a pickle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.tree import DecisionTreeRegressor

from processors.prognosis.data import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURES, FeatureValue

#: At most four questions per patient. On the trial data depth 3 reproduced less of the model
#: (cross-validated R^2 0.87, risk group agreement 77 %) than depth 4 (0.90, 84 %), and depth 5 added little.
SURROGATE_DEPTH = 4
#: No leaf describes fewer patients than this, so each leaf's mean risk rests on a real group.
MIN_LEAF_PATIENTS = 30
ARM_COLUMN_PREFIX = "rx="


class SurrogateNode(BaseModel):
    """One node of the surrogate tree; a leaf has no ``column``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str | None = Field(description="Feature name, or 'rx=<arm>' for one treatment arm; null on a leaf.")
    threshold: float | None = Field(description="Rows with a value at most this go left.")
    left: int | None
    right: int | None
    missing_left: bool | None = Field(description="Whether a missing value goes left.")
    mean_probability: float = Field(description="Mean model probability of the training patients in the node.")
    patients: int


class SurrogateTree(BaseModel):
    """The fitted surrogate tree and its fidelity to the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    depth: int
    min_leaf_patients: int
    nodes: list[SurrogateNode]
    fidelity_r2_training: float = Field(description="R^2 of the tree against the model on the training patients.")
    fidelity_r2_cross_validated: float = Field(
        description="R^2 against the model on patients left out of the tree's fit (5-fold)."
    )
    risk_group_agreement: float = Field(
        description="Share of training patients whose risk group is the same from the tree and from the model."
    )


class DecisionStep(BaseModel):
    """One question on the decision path, answered for the patient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: str
    label: str
    display_value: str = Field(description="The patient's value with its unit, or 'missing'.")
    condition: str = Field(description="The branch taken, in clinical words, for example 'more than 4 nodes'.")
    text: str = Field(
        description="The step as one line, for example 'Positive lymph nodes = 6 nodes (more than 4 nodes)'."
    )


class DecisionPath(BaseModel):
    """The patient's path through the surrogate tree and the group it ends in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[DecisionStep]
    group_probability: float = Field(description="Mean model probability of the training patients in the leaf.")
    group_patients: int = Field(description="Training patients in the leaf.")
    conclusion: str
    fidelity_r2: float = Field(description="Cross-validated R^2 of the surrogate tree against the model.")


def surrogate_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Return the tree's input columns: the features with ``rx`` one-hot encoded; missing values stay NaN."""
    columns = table.loc[:, [name for name in FEATURE_NAMES if name not in CATEGORICAL_FEATURES]].astype(float)
    for arm in FEATURES["rx"].codes:
        columns[f"{ARM_COLUMN_PREFIX}{arm}"] = (table["rx"] == arm).astype(float)
    return columns


def fit_surrogate(
    table: pd.DataFrame,
    model_probability: np.ndarray,
    risk_group: Callable[[float], str],
    seed: int,
    depth: int = SURROGATE_DEPTH,
) -> SurrogateTree:
    """Fit the surrogate tree to the model's probabilities on ``table`` and measure its fidelity.

    Args:
        table: Training patients with the feature columns.
        model_probability: The model's predicted 5-year probability for each row.
        risk_group: Maps a probability to its risk group, for the agreement figure.
        seed: Seed of the tree and of the cross-validation split.
        depth: Maximum depth of the tree.
    """
    columns = surrogate_columns(table)
    tree = DecisionTreeRegressor(max_depth=depth, min_samples_leaf=MIN_LEAF_PATIENTS, random_state=seed)
    tree.fit(columns, model_probability)

    held_out = cross_val_predict(
        DecisionTreeRegressor(max_depth=depth, min_samples_leaf=MIN_LEAF_PATIENTS, random_state=seed),
        columns,
        model_probability,
        cv=KFold(n_splits=5, shuffle=True, random_state=seed),
    )
    fitted = tree.predict(columns)
    agreement = np.mean([risk_group(a) == risk_group(b) for a, b in zip(fitted, model_probability, strict=True)])
    return SurrogateTree(
        target="the model's predicted probability of recurrence within 5 years",
        depth=depth,
        min_leaf_patients=MIN_LEAF_PATIENTS,
        nodes=_export_nodes(tree, list(columns.columns)),
        fidelity_r2_training=float(r2_score(model_probability, fitted)),
        fidelity_r2_cross_validated=float(r2_score(model_probability, held_out)),
        risk_group_agreement=float(agreement),
    )


def _export_nodes(tree: DecisionTreeRegressor, column_names: list[str]) -> list[SurrogateNode]:
    structure = tree.tree_
    nodes: list[SurrogateNode] = []
    for index in range(structure.node_count):
        is_leaf = structure.children_left[index] == -1
        nodes.append(
            SurrogateNode(
                column=None if is_leaf else column_names[structure.feature[index]],
                threshold=None if is_leaf else float(structure.threshold[index]),
                left=None if is_leaf else int(structure.children_left[index]),
                right=None if is_leaf else int(structure.children_right[index]),
                missing_left=None if is_leaf else bool(structure.missing_go_to_left[index]),
                mean_probability=float(structure.value[index][0][0]),
                patients=int(structure.n_node_samples[index]),
            )
        )
    return nodes


def decision_path(tree: SurrogateTree, features: Mapping[str, FeatureValue]) -> DecisionPath:
    """Follow the surrogate tree for one patient and describe each branch in clinical words.

    Args:
        tree: The surrogate stored with the model.
        features: Validated feature values by name; None is missing.
    """
    steps: list[DecisionStep] = []
    node = tree.nodes[0]
    while node.column is not None:
        goes_left, step = _answer(node, features)
        steps.append(step)
        node = tree.nodes[node.left if goes_left else node.right]

    conclusion = (
        f"Trial patients on this branch ({node.patients}) have a mean model-predicted 5-year recurrence "
        f"risk of {node.mean_probability:.0%}."
    )
    return DecisionPath(
        steps=steps,
        group_probability=node.mean_probability,
        group_patients=node.patients,
        conclusion=conclusion,
        fidelity_r2=tree.fidelity_r2_cross_validated,
    )


def _answer(node: SurrogateNode, features: Mapping[str, FeatureValue]) -> tuple[bool, DecisionStep]:
    """Decide the branch for one node and word it."""
    if node.column.startswith(ARM_COLUMN_PREFIX):
        return _answer_arm(node, features)

    feature = FEATURES[node.column]
    value = features.get(node.column)
    if value is None:
        goes_left = bool(node.missing_left)
        condition = f"grouped with {_side_text(node, goes_left)}"
    else:
        goes_left = float(value) <= node.threshold
        condition = _side_text(node, goes_left)
    return goes_left, _step(feature.name, feature.display(value), condition)


def _answer_arm(node: SurrogateNode, features: Mapping[str, FeatureValue]) -> tuple[bool, DecisionStep]:
    feature = FEATURES["rx"]
    arm = node.column.removeprefix(ARM_COLUMN_PREFIX)
    in_arm = features.get("rx") == arm
    meaning = feature.codes[arm]
    condition = meaning if in_arm else f"not {meaning}"
    return not in_arm, _step("rx", feature.display(features.get("rx")), condition)


def _step(name: str, display: str, condition: str) -> DecisionStep:
    label = FEATURES[name].label
    text = f"{label} = {display}" if condition == display else f"{label} = {display} ({condition})"
    return DecisionStep(feature=name, label=label, display_value=display, condition=condition, text=text)


def _side_text(node: SurrogateNode, left: bool) -> str:
    """Word one side of a split: the codes it holds, or the range of a number."""
    feature = FEATURES[node.column]
    threshold = node.threshold
    if feature.codes:
        side = [meaning for code, meaning in feature.codes.items() if (float(code) <= threshold) == left]
        return side[0] if len(side) == 1 else f"{side[0]} to {side[-1]}"
    if feature.kind == "count":
        whole = math.floor(threshold)
        return f"{whole} {feature.unit} or fewer" if left else f"more than {whole} {feature.unit}"
    return f"{threshold:g} {feature.unit} or less" if left else f"more than {threshold:g} {feature.unit}"
