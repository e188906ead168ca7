"""GLUE's task metrics, written out: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

Plain Python over sequences of numbers, so a result is what the formula says and nothing else; an undefined
correlation (a constant input) is 0, as scikit-learn reports Matthews correlation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Numbers = Sequence[float]


def accuracy(predictions: Numbers, labels: Numbers) -> float:
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def f1(predictions: Numbers, labels: Numbers, positive: int = 1) -> float:
    """F1 of the positive class (MRPC, QQP): 2 TP / (2 TP + FP + FN)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == positive and y == positive for p, y in pairs)
    wrong = sum((p == positive) != (y == positive) for p, y in pairs)
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def matthews(predictions: Numbers, labels: Numbers) -> float:
    """Matthews correlation (CoLA), in its K-class form (Gorodkin 2004), which is the usual one for K = 2:
    (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with c the correct count, s the total,
    p_k and t_k how often class k is predicted and true."""
    pairs = list(zip(predictions, labels, strict=True))
    classes = {*predictions, *labels}
    s, c = len(pairs), sum(p == y for p, y in pairs)
    predicted = {k: sum(p == k for p, _ in pairs) for k in classes}
    true = {k: sum(y == k for _, y in pairs) for k in classes}
    numerator = c * s - sum(predicted[k] * true[k] for k in classes)
    spread_p = s * s - sum(v * v for v in predicted.values())
    spread_t = s * s - sum(v * v for v in true.values())
    denominator = math.sqrt(spread_p * spread_t)
    return numerator / denominator if denominator else 0.0


def pearson(predictions: Numbers, labels: Numbers) -> float:
    n = len(labels)
    mean_p, mean_y = sum(predictions) / n, sum(labels) / n
    dp = [p - mean_p for p in predictions]
    dy = [y - mean_y for y in labels]
    denominator = math.sqrt(sum(d * d for d in dp) * sum(d * d for d in dy))
    return sum(a * b for a, b in zip(dp, dy, strict=True)) / denominator if denominator else 0.0


def ranks(values: Numbers) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(predictions: Numbers, labels: Numbers) -> float:
    """Pearson correlation of the ranks (STS-B)."""
    return pearson(ranks(predictions), ranks(labels))


METRICS: dict[str, Callable[[Numbers, Numbers], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman,
}


def compute(names: Sequence[str], predictions: Numbers, labels: Numbers) -> dict[str, float]:
    return {name: METRICS[name](predictions, labels) for name in names}
