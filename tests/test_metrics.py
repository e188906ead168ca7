"""Each downstream metric against a value worked out by hand (in the comments) on fixed predictions."""

import math

import pytest

from tcd_ds.downstream.metrics import accuracy, compute, f1, matthews, pearson, ranks, spearman

# Binary predictions and labels: TP at 0 and 2, FN at 1, FP at 3, TN at 4.
PRED = [1, 0, 1, 1, 0]
GOLD = [1, 1, 1, 0, 0]


def test_accuracy():
    assert accuracy(PRED, GOLD) == pytest.approx(3 / 5)


def test_f1_of_the_positive_class():
    # precision 2/3, recall 2/3 -> F1 = 2 * 2 / (2 * 2 + 1 + 1) = 2/3
    assert f1(PRED, GOLD) == pytest.approx(2 / 3)
    # with 0 as the positive class: TP at 4, FP at 1, FN at 3 -> 2 / (2 + 2) = 1/2
    assert f1(PRED, GOLD, positive=0) == pytest.approx(1 / 2)
    assert f1([0, 0], [1, 1]) == 0.0  # no true positive


def test_matthews_binary():
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews(PRED, GOLD) == pytest.approx(1 / 6)
    # scikit-learn's documented example: y_true [+1, +1, +1, -1], y_pred [+1, -1, +1, +1] -> -1/3
    assert matthews([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)
    assert matthews(GOLD, GOLD) == pytest.approx(1.0)
    assert matthews([1, 1, 1, 1, 1], GOLD) == 0.0  # a constant prediction: undefined, reported as 0


def test_matthews_multiclass():
    # 3 classes, each predicted twice and true twice, 3 of 6 correct:
    # (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = (3*6 - 12) / sqrt((36 - 12)(36 - 12)) = 1/4
    assert matthews([0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0]) == pytest.approx(0.25)


def test_pearson():
    # deviations x: -1.5 -.5 .5 1.5, y: -3 -1 0 4; sum xy = 11, sum x^2 = 5, sum y^2 = 26 -> 11 / sqrt(130)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant: undefined, reported as 0


def test_ranks_average_ties():
    assert ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]


def test_spearman_with_ties():
    # ranks x: 1 2.5 2.5 4, y: 1 3 2 4; deviations x: -1.5 0 0 1.5, y: -1.5 .5 -.5 1.5
    # sum xy = 4.5, sum x^2 = 4.5, sum y^2 = 5 -> 4.5 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 10, 100, 1000], [1, 2, 3, 4]) == pytest.approx(1.0)  # monotone, not linear


def test_compute_names_each_metric():
    assert compute(["accuracy", "f1"], PRED, GOLD) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
