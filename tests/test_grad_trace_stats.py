"""Analysis numbers against hand-computed values on small fixed vectors."""

import pytest

from llada_trm.training.grad_trace.stats import gini, opposing_fraction, pearson, summary, weight_fraction


def test_gini_by_hand():
    # sorted 1 2 3 4: sum (2i - 5) x_i = -3 - 2 + 3 + 12 = 10; n * sum = 40.
    assert gini([4.0, 1.0, 3.0, 2.0]) == pytest.approx(0.25)
    assert gini([5.0, 5.0, 5.0]) == pytest.approx(0.0)
    # one token of four carries everything: (2*4 - 5) * 1 / (4 * 1) = 0.75
    assert gini([0.0, 0.0, 0.0, 1.0]) == pytest.approx(0.75)
    assert gini([]) is None and gini([0.0, 0.0]) is None


def test_weight_fraction_by_hand():
    # total 10; largest first: 4 (40%), 4+3 (70%), 4+3+2 = 9 (90% >= 80%) -> 3 of 4 tokens.
    assert weight_fraction([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.75)
    # 8 of 10 reached exactly by the first token: 1 of 3.
    assert weight_fraction([8.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    assert weight_fraction([1.0] * 5) == pytest.approx(0.8)
    assert weight_fraction([1.0, 2.0, 3.0, 4.0], share=0.5) == pytest.approx(0.5)  # 4 + 3 = 7 >= 5


def test_opposing_fraction_by_hand():
    assert opposing_fraction([0.5, -0.1, 0.0, -0.3, 0.2]) == pytest.approx(0.4)  # 0 does not oppose
    assert opposing_fraction([]) is None


def test_pearson_by_hand():
    # x = 1 2 3, y = 1 3 2: means 2, 2; sxy = (-1)(-1) + 0 + (1)(0) = 1; sxx = 2, syy = 2 -> r = 0.5
    assert pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert pearson([1.0, 2.0, 3.0], [-2.0, -4.0, -6.0]) == pytest.approx(-1.0)
    assert pearson([1.0, 1.0], [1.0, 2.0]) is None


def test_summary_combines_them():
    s = summary([1.0, 2.0, 3.0, 4.0], [0.1, -0.2, 0.3, 0.4])
    assert s["tokens"] == 4 and s["gini"] == pytest.approx(0.25) and s["weight_fraction_80"] == pytest.approx(0.75)
    assert s["opposing_fraction"] == pytest.approx(0.25) and s["mean_alignment"] == pytest.approx(0.15)
    assert s["mean_magnitude"] == pytest.approx(2.5)
