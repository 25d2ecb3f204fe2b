"""Tests of the surrogate decision tree: fitting, fidelity and the wording of each step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from processors.prognosis.surrogate import SurrogateNode, SurrogateTree, decision_path, fit_surrogate

LEAF = {"column": None, "threshold": None, "left": None, "right": None, "missing_left": None}


def node(column: str, threshold: float, left: int, right: int, missing_left: bool = True) -> SurrogateNode:
    return SurrogateNode(
        column=column,
        threshold=threshold,
        left=left,
        right=right,
        missing_left=missing_left,
        mean_probability=0.5,
        patients=100,
    )


def leaf(probability: float, patients: int) -> SurrogateNode:
    return SurrogateNode(**LEAF, mean_probability=probability, patients=patients)


def tree_of(nodes: list[SurrogateNode]) -> SurrogateTree:
    return SurrogateTree(
        target="test",
        depth=2,
        min_leaf_patients=30,
        nodes=nodes,
        fidelity_r2_training=0.9,
        fidelity_r2_cross_validated=0.85,
        risk_group_agreement=0.8,
    )


# nodes <= 4.5 -> extent <= 2.5 ; otherwise an arm question.
TREE = tree_of(
    [
        node("nodes", 4.5, 1, 4, missing_left=True),
        node("extent", 2.5, 2, 3),
        leaf(0.2, 40),
        leaf(0.45, 300),
        node("rx=Lev+5FU", 0.5, 5, 6),
        leaf(0.8, 120),
        leaf(0.6, 90),
    ]
)

PATIENT = {"rx": "Lev", "nodes": 6.0, "extent": 3.0, "age": 62.0}


def test_path_through_count_and_arm() -> None:
    path = decision_path(TREE, PATIENT)

    assert [step.text for step in path.steps] == [
        "Positive lymph nodes = 6 nodes (more than 4 nodes)",
        "Treatment arm = levamisole (not levamisole + fluorouracil)",
    ]
    assert path.group_probability == 0.8
    assert path.group_patients == 120
    assert path.conclusion.startswith("Trial patients on this branch (120)")
    assert "80%" in path.conclusion
    assert path.fidelity_r2 == 0.85


def test_path_arm_taken() -> None:
    path = decision_path(TREE, {**PATIENT, "rx": "Lev+5FU"})

    assert path.steps[1].condition == "levamisole + fluorouracil"
    assert path.steps[1].text == "Treatment arm = levamisole + fluorouracil"
    assert path.group_probability == 0.6


def test_path_ordinal_codes_as_range() -> None:
    path = decision_path(TREE, {**PATIENT, "nodes": 1.0, "extent": 2.0})

    assert path.steps[0].text == "Positive lymph nodes = 1 node (4 nodes or fewer)"
    assert path.steps[1].condition == "submucosa (T1) to muscle (T2)"
    assert path.steps[1].text == "Local spread = muscle (T2) (submucosa (T1) to muscle (T2))"


def test_path_missing_value_follows_learned_side() -> None:
    path = decision_path(TREE, {**PATIENT, "nodes": None})

    assert path.steps[0].display_value == "missing"
    assert path.steps[0].condition == "grouped with 4 nodes or fewer"
    assert path.steps[1].feature == "extent"


def test_path_binary_feature_single_code() -> None:
    tree = tree_of([node("adhere", 0.5, 1, 2), leaf(0.4, 500), leaf(0.7, 100)])

    assert decision_path(tree, {"adhere": 1.0}).steps[0].text == "Adherence to nearby organs = yes"
    assert decision_path(tree, {"adhere": 0.0}).steps[0].text == "Adherence to nearby organs = no"


def test_path_continuous_threshold() -> None:
    tree = tree_of([node("age", 63.5, 1, 2), leaf(0.4, 500), leaf(0.5, 400)])

    assert decision_path(tree, {"age": 70.0}).steps[0].condition == "more than 63.5 years"
    assert decision_path(tree, {"age": 40.0}).steps[0].condition == "63.5 years or less"


def test_fit_surrogate_recovers_simple_model() -> None:
    rng = np.random.default_rng(0)
    size = 400
    table = pd.DataFrame(
        {
            "rx": rng.choice(["Obs", "Lev", "Lev+5FU"], size),
            "sex": rng.integers(0, 2, size).astype(float),
            "age": rng.uniform(30, 80, size),
            "obstruct": 0.0,
            "perfor": 0.0,
            "adhere": 0.0,
            "nodes": rng.integers(0, 15, size).astype(float),
            "differ": 2.0,
            "extent": 3.0,
            "surg": 0.0,
            "node4": 0.0,
        }
    )
    table.loc[:20, "nodes"] = np.nan
    probability = np.where(table["nodes"].fillna(2) > 4, 0.7, 0.3) - 0.1 * (table["rx"] == "Lev+5FU")

    tree = fit_surrogate(table, probability.to_numpy(), lambda p: "high" if p >= 0.5 else "low", seed=0, depth=2)

    assert tree.nodes[0].column == "nodes"
    assert tree.nodes[0].threshold == pytest.approx(4.5)
    assert tree.fidelity_r2_training == pytest.approx(1.0)
    assert tree.fidelity_r2_cross_validated > 0.95
    assert tree.risk_group_agreement == pytest.approx(1.0)
    assert all(item.patients >= tree.min_leaf_patients for item in tree.nodes if item.column is None)
