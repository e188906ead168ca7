"""The protocol's verdicts: the learning rate the held-out slice selects, and paired differences with their
intervals, checked against the computations written out by hand."""

import math
import random
import statistics

import pytest

from tcd_ds.downstream.finetune import grid_result, merge_results
from tcd_ds.downstream.metrics import compute
from tcd_ds.downstream.stats import BOOTSTRAP_DRAWS, bootstrap_interval, paired_difference, t_interval

HEADER = {"model": "m", "task": "t", "mode": "full", "metrics": ["accuracy"], "main_metric": "accuracy",
          "report_split": "test", "selection": "heldout", "selection_rule": "r", "heldout_examples": 10,
          "train_examples": 90, "labels": [0, 1], "config": {}}


def run(lr: float, seed: int, heldout: float, test: float) -> dict:
    return {"lr": lr, "seed": seed, "heldout": heldout, "scores": {"test": {"accuracy": test}},
            "constant_predictions": [], "predictions": [0, 1]}


def test_the_heldout_slice_alone_selects_the_learning_rate():
    """lr 1e-3 is better on the held-out slice, 1e-4 on test: 1e-3 is selected and reported, whatever test says."""
    runs = [run(1e-4, s, 0.70, 0.90) for s in (1, 2)] + [run(1e-3, s, 0.80, 0.60) for s in (1, 2)]
    result = grid_result(HEADER, runs)
    assert result["selected_lr"] == 1e-3 and [r["lr"] for r in result["runs"]] == [1e-3, 1e-3]
    assert result["summary"]["test"]["accuracy"]["mean"] == pytest.approx(0.60)
    assert result["lr_grid"]["0.0001"]["test"]["mean"] == pytest.approx(0.90)  # kept, not used
    for r in runs:
        r["scores"]["test"]["accuracy"] = 1.0 if r["lr"] == 1e-4 else 0.0
    assert grid_result(HEADER, runs)["selected_lr"] == 1e-3


def test_jobs_merge_into_the_result_of_one_command():
    runs = [run(lr, s, 0.5 + lr * 100 + s / 100, 0.5) for lr in (1e-4, 1e-3) for s in (1, 2)]
    jobs = [grid_result(HEADER, [r]) for r in runs]
    assert merge_results(jobs) == grid_result(HEADER, runs)


def test_t_interval_by_hand():
    d = [0.02, 0.05, -0.01]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom), from a table
    assert t_interval(d) == pytest.approx({"mean": mean, "low": mean - half, "high": mean + half})


def test_bootstrap_against_a_plain_loop():
    """The same draws (numpy's generator, seed 0), the metric computed by the plain-Python formulas per draw."""
    import numpy as np

    rng = random.Random(1)
    labels = [rng.randrange(2) for _ in range(40)]
    a = [[y if rng.random() < 0.8 else 1 - y for y in labels] for _ in range(3)]
    b = [[y if rng.random() < 0.6 else 1 - y for y in labels] for _ in range(3)]
    draws = np.random.default_rng(0).integers(0, 40, size=(BOOTSTRAP_DRAWS, 40))
    for metric in ("accuracy", "f1"):
        naive = sorted(statistics.fmean(
            compute([metric], [pa[i] for i in d], [labels[i] for i in d])[metric]
            - compute([metric], [pb[i] for i in d], [labels[i] for i in d])[metric] for pa, pb in zip(a, b))
            for d in draws)
        interval = bootstrap_interval(a, b, labels, metric)
        assert interval["low"] == pytest.approx(np.percentile(naive, 2.5))
        assert interval["high"] == pytest.approx(np.percentile(naive, 97.5))


def test_paired_difference_pairs_by_seed_and_says_whether_zero_is_excluded():
    labels = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    def result(scores: dict[int, float], right: int) -> dict:
        predictions = labels[:right] + [1 - y for y in labels[right:]]
        return {"report_split": "test", "labels": labels, "runs": [
            {"seed": s, "scores": {"test": {"accuracy": v}}, "predictions": predictions} for s, v in scores.items()]}
    better, worse = result({2: 0.9, 1: 0.8}, 9), result({1: 0.6, 2: 0.7}, 5)
    d = paired_difference(better, worse, "accuracy")
    assert d["seeds"] == [1, 2] and d["differences"] == pytest.approx([0.2, 0.2])
    assert d["t"]["excludes_zero"] and d["bootstrap"]["excludes_zero"] and d["bootstrap"]["low"] > 0
    assert not paired_difference(better, better, "accuracy")["bootstrap"]["excludes_zero"]
    with pytest.raises(ValueError, match="unpaired"):
        paired_difference(better, result({1: 0.5}, 5), "accuracy")
