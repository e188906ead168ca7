"""The metrics logger: the log window, its cadence, and where records go (metrics.jsonl and W&B, rank 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import deepspeed.comm as dist
import torch


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step."""

    def __init__(self, path: Path, resume_step: int):
        """On resume, drop what an interrupted launch logged past its last checkpoint, so the file reads as
        one uninterrupted run."""
        self.path = Path(path)
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill mid-write
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pooled_mean(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each loss term over the log window and over data-parallel ranks: one all-reduce per log."""
    names = sorted(window[0])
    stacked = torch.stack([torch.stack([torch.as_tensor(w[n], dtype=torch.float32) for n in names]) for w in window])
    means = stacked.mean(0)
    dist.all_reduce(means)
    means /= dist.get_world_size()
    return {f"loss/{n}": v for n, v in zip(names, means.tolist())}


class MetricsLogger:
    """Keeps each step's loss terms (on device) until a logged step, every `every` steps and at a launch's last;
    then pools them over the window and the ranks into one record (a collective: every rank calls `record`)."""

    def __init__(self, every: int, tokens_per_step: int, writers: list):
        self.every, self.tokens_per_step = every, tokens_per_step
        self.writers = writers  # rank 0: MetricsLog and the W&B run, if any; other ranks: none
        self.window: list[dict[str, torch.Tensor]] = []
        self.window_start = time.perf_counter()

    def should_log(self, step: int, launch_end: int) -> bool:
        return step % self.every == 0 or step == launch_end

    def step(self, terms: dict[str, torch.Tensor]) -> None:
        self.window.append(terms)

    def record(self, step: int) -> dict:
        """The window's pooled losses and throughput; the window starts again."""
        elapsed = time.perf_counter() - self.window_start
        record = {"step": step, **pooled_mean(self.window),
                  "tokens_per_s": self.tokens_per_step * len(self.window) / elapsed}
        self.window, self.window_start = [], time.perf_counter()
        return record

    def write(self, record: dict) -> None:
        for writer in self.writers:
            writer.write(record)
