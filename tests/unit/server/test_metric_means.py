from __future__ import annotations

import doctest

import pytest

from fedgate.server.coordinator import MetricMeans


def test_a_metric_some_agents_leave_out_is_averaged_over_those_that_report_it():
    means = MetricMeans()
    means.add({"loss": 0.2, "auc": 0.81}, 100)   # a site that has seen faults
    means.add({"loss": 0.4}, 300)                # a fault-free site: no AUC
    out = means.result()
    assert out["auc"] == pytest.approx(0.81)
    assert out["loss"] == pytest.approx((0.2 * 100 + 0.4 * 300) / 400)


def test_zero_sample_reports_still_count_once():
    means = MetricMeans()
    means.add({"f1": 0.5}, 0)
    assert means.result() == {"f1": 0.5}


def test_docstring_example_runs():
    runner = doctest.DocTestRunner(verbose=False)
    for test in doctest.DocTestFinder().find(MetricMeans, globs={"MetricMeans": MetricMeans}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert runner.summarize(verbose=False).attempted >= 2
