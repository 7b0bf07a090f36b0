"""common.metrics: GLUE's MRPC quality numbers from (predicted, expected) labels."""

from __future__ import annotations

import pytest

from bertpool.common.metrics import binary_report


def test_counts_and_ratios():
    r = binary_report([(1, 1), (1, 1), (1, 0), (0, 1), (0, 0), (0, 0)])
    assert r["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1} and r["n"] == 6
    assert r["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert r["precision"] == pytest.approx(2 / 3, abs=1e-4) and r["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["f1"] == pytest.approx(2 / 3, abs=1e-4)


@pytest.mark.parametrize("pairs, f1, accuracy", [
    ([], 0.0, 0.0),                    # nothing answered: zeros, never NaN
    ([(0, 0), (0, 0)], 0.0, 1.0),      # no positives at all
    ([(1, 0), (1, 0)], 0.0, 0.0),      # only false positives
    ([(1, 1)], 1.0, 1.0),              # batch of one
])
def test_edge_cases_have_no_nan(pairs, f1, accuracy):
    r = binary_report(pairs)
    assert r["f1"] == f1 and r["accuracy"] == accuracy and r["n"] == len(pairs)
