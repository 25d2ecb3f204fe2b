"""Tests of the evaluation command's pieces and of the benchmark page (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processors.prognosis.benchmark import Latency, summarize, write_page
from processors.prognosis.evaluate import CATBOOST, COX, METRICS, FoldScore, compare, evaluate_endpoint
from processors.prognosis.evaluation_report import verdict_sentence, write_report
from processors.prognosis.survival_model import RecurrenceSurvivalModel

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fold_scores(catboost_c: list[float], cox_c: list[float]) -> list[FoldScore]:
    scores = []
    for fold, (ours, theirs) in enumerate(zip(catboost_c, cox_c, strict=True)):
        for model, value in ((CATBOOST, ours), (COX, theirs)):
            scores.append(FoldScore("death", model, 0, fold, value, 0.7, 0.7, 0.2, 0.2, 0.15))
    return scores


@pytest.mark.parametrize(
    ("catboost_c", "cox_c", "verdict"),
    [
        ([0.70, 0.71, 0.72, 0.70, 0.71], [0.65, 0.66, 0.66, 0.65, 0.66], "CatBoost better"),
        ([0.60, 0.61, 0.60, 0.62, 0.61], [0.66, 0.66, 0.67, 0.66, 0.67], "Cox PH better"),
        ([0.66, 0.64, 0.67, 0.63, 0.65], [0.65, 0.65, 0.66, 0.64, 0.66], "no clear difference"),
    ],
)
def test_compare_verdict(catboost_c: list[float], cox_c: list[float], verdict: str) -> None:
    comparison = compare(fold_scores(catboost_c, cox_c), "c_index", folds=5)

    assert comparison.verdict == verdict
    assert comparison.folds == 5
    assert comparison.low <= comparison.difference <= comparison.high


def test_compare_lower_is_better_for_brier() -> None:
    scores = fold_scores([0.65] * 5, [0.65] * 5)
    for score, brier in zip(scores, [0.10, 0.20, 0.11, 0.21, 0.10, 0.20, 0.12, 0.21, 0.11, 0.22], strict=True):
        score.ibs = brier

    comparison = compare(scores, "ibs", folds=5)
    assert comparison.difference < 0
    assert comparison.verdict == "CatBoost better"
    assert comparison.catboost_wins == 5


@pytest.fixture(scope="module")
def small_evaluation() -> object:
    # One repeat of 3 folds on the death endpoint: enough to run every code path.
    return evaluate_endpoint("death", repeats=1, folds=3, seed=0)


def test_evaluate_endpoint_structure(small_evaluation) -> None:  # noqa: ANN001 - EndpointResult
    result = small_evaluation

    assert result.patients == 929
    assert result.events == 452
    assert len(result.scores) == 2 * 3
    assert {score.model for score in result.scores} == {CATBOOST, COX}
    assert [comparison.metric for comparison in result.comparisons] == list(METRICS)
    assert len(result.calibration) == 4
    assert len(result.kaplan_meier_ibs) == 3
    for score in result.scores:
        assert 0.55 < score.c_index < 0.8
        assert 0.55 < score.auc_5y < 0.85
        assert 0.0 < score.ibs < sum(result.kaplan_meier_ibs) / 3 + 0.02


def test_write_report_files(small_evaluation, tmp_path: Path) -> None:  # noqa: ANN001 - EndpointResult
    run = {"command": "test", "repeats": 1, "folds": 3, "seed": 0, "elapsed_s": 1.0, "date": "today", "machine": "m"}
    page = write_report([small_evaluation], run, tmp_path)
    text = page.read_text()

    assert verdict_sentence(small_evaluation) in text
    assert "CatBoost" in verdict_sentence(small_evaluation)
    for name in ("fold_metrics.png", "calibration.png", "brier_over_time.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"plots/{name}" in text
    raw = json.loads((tmp_path / "evaluation.json").read_text())
    assert len(raw["endpoints"][0]["scores"]) == 6


def test_summarize_percentiles() -> None:
    latency = summarize("x", [0.001 * value for value in range(1, 101)])

    assert latency.calls == 100
    assert latency.p50 == pytest.approx(50.5)
    assert latency.p95 == pytest.approx(95.05)
    assert latency.maximum == pytest.approx(100.0)


def test_benchmark_page_states_bar(tmp_path: Path) -> None:
    results = [
        Latency("record: Bundle mapping + predict + SHAP + decision path", 10, 5.0, 8.0, 5.5, 9.0),
        Latency("what-if over HTTP, patient by feature values", 10, 30.0, 60.0, 35.0, 70.0),
    ]
    page = tmp_path / "prognosis.md"
    write_page(results, page, "python -m processors.prognosis.benchmark", "Kafka up", RecurrenceSurvivalModel.load())
    text = page.read_text()

    assert "Measured worst p95 60.0 ms: NOT met." in text
    assert "| what-if over HTTP, patient by feature values | 10 | 30.0 | 60.0 | 35.0 | 70.0 |" in text
    assert "Command: `python -m processors.prognosis.benchmark`" in text


def test_run_benchmark_through_uvicorn() -> None:
    from processors.prognosis.benchmark import run_benchmark
    from processors.prognosis.survival_model import DEFAULT_WEIGHTS

    results = run_benchmark(records=3, seed=0, weights=DEFAULT_WEIGHTS)

    assert len(results) == 6
    assert all(result.calls == 3 for result in results)
    assert [result.name for result in results if result.name.startswith("what-if over HTTP")] == [
        "what-if over HTTP, patient by feature values",
        "what-if over HTTP, patient by record id (reads the Bundle)",
    ]
