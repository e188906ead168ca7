"""What a set of fine-tuning runs says: the summary over seeds, the learning rate a grid selects on the held-out
slice, and whether two models differ (paired over seeds, which share the data order and the held-out slice).

Two 95% intervals of a difference of means, A - B:
- over seeds: the per-seed differences d_s, mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n) (Student's t: a
  difference is "real" across training seeds);
- over evaluation examples: a percentile bootstrap that resamples the evaluation set (the same draw for every seed
  and both models, so the pairing holds) and averages the per-seed differences of the metric on each draw (a
  difference is "real" beyond the luck of which examples were evaluated; it works with 3 seeds).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy.stats import t as student_t

from tcd_ds.downstream.metrics import METRICS

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0


def summary(scores: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), minimum and maximum."""
    return {"mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores), "max": max(scores)}


def select_lr(heldout: dict[float, list[float]]) -> float:
    """The learning rate with the best mean held-out score over seeds (the first in grid order on a tie). Only
    the held-out slice decides: the reported splits never see the selection."""
    return max(heldout, key=lambda lr: statistics.fmean(heldout[lr]))


def t_interval(differences: list[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of paired differences with its Student-t interval; one seed has no spread: a zero-width interval."""
    n, mean = len(differences), statistics.fmean(differences)
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean}
    half = student_t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half}


def metric_on_draws(metric: str, predictions: np.ndarray, labels: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """`metric` on each bootstrap draw (rows of example indices): vectorised for accuracy, else one call a draw."""
    if metric == "accuracy":
        return (predictions == labels)[draws].mean(axis=1)
    function = METRICS[metric]
    return np.array([function(predictions[d].tolist(), labels[d].tolist()) for d in draws])


def bootstrap_interval(a: list[list[float]], b: list[list[float]], labels: list[float], metric: str,
                       confidence: float = CONFIDENCE, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """Percentile interval of mean over seeds of metric(A_s) - metric(B_s) over resampled evaluation sets;
    `a[s]`, `b[s]` are seed s's predictions, in the order of `labels`."""
    y = np.asarray(labels)
    index = np.random.default_rng(seed).integers(0, len(y), size=(draws, len(y)))
    per_seed = [metric_on_draws(metric, np.asarray(pa), y, index) - metric_on_draws(metric, np.asarray(pb), y, index)
                for pa, pb in zip(a, b, strict=True)]
    differences = np.mean(per_seed, axis=0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return {"low": float(low), "high": float(high)}


def paired_difference(a: dict, b: dict, metric: str) -> dict:
    """A - B on the reported split, paired by seed: mean, the t interval over seeds, the bootstrap interval over
    evaluation examples, and whether each interval excludes zero. `a`, `b`: fine-tuning results of the same task,
    mode and seeds (`tcd-ds finetune`'s JSON)."""
    runs_a, runs_b = by_seed(a), by_seed(b)
    if sorted(runs_a) != sorted(runs_b):
        raise ValueError(f"unpaired results: seeds {sorted(runs_a)} and {sorted(runs_b)}")
    split, seeds = a["report_split"], sorted(runs_a)
    differences = [runs_a[s]["scores"][split][metric] - runs_b[s]["scores"][split][metric] for s in seeds]
    over_seeds = t_interval(differences)
    over_examples = bootstrap_interval([runs_a[s]["predictions"] for s in seeds],
                                       [runs_b[s]["predictions"] for s in seeds], a["labels"], metric)
    return {"metric": metric, "split": split, "seeds": seeds, "differences": differences, "mean": over_seeds["mean"],
            "t": {**over_seeds, "excludes_zero": not over_seeds["low"] <= 0 <= over_seeds["high"]},
            "bootstrap": {**over_examples, "excludes_zero": not over_examples["low"] <= 0 <= over_examples["high"]}}


def by_seed(result: dict) -> dict[int, dict]:
    return {run["seed"]: run for run in result["runs"]}
