"""The bench's tables: a ratio a target is judged by shows its median and the lowest and highest of one round."""

from bench.framework import Column, Ratio, ScenarioResult, VariantResult
from bench.report import table


def result(spread: bool) -> ScenarioResult:
    base = VariantResult("stunnel", runs=[{"p50": 1.0}, {"p50": 2.0}, {"p50": 1.0}])
    ours = VariantResult("ours", runs=[{"p50": 1.5}, {"p50": 2.0}, {"p50": 2.0}])
    return ScenarioResult(
        scenario="s",
        title="t",
        columns=[Column("p50", "p50")],
        variants=[base, ours],
        ratios=[Ratio("p50", "stunnel", "vs stunnel", spread=spread)],
    )


def test_round_ratios_pair_each_run_with_the_baselines_run_of_the_same_round() -> None:
    r = result(spread=True)
    assert r.round_ratios(r.variants[1], r.ratios[0]) == [1.5, 1.0, 2.0]
    assert r.round_ratios(r.variants[0], r.ratios[0]) == []  # the baseline has no ratio to itself
    assert r.ratio(r.variants[1], r.ratios[0]) == 2.0 / 1.0  # the headline stays median over median


def test_table_shows_the_spread_only_where_asked() -> None:
    assert "2.00x (1.00-2.00)" in table(result(spread=True))
    plain = table(result(spread=False))
    assert "2.00x" in plain and "(1.00-2.00)" not in plain
