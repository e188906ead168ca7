"""Validation during training: when it runs, and the MLM loss and accuracy it pools across ranks."""

from __future__ import annotations

import deepspeed.comm as dist
import torch

from tcd_ds.models.scoring import mlm_sums


class Validation:
    """Every `every` steps and at the run's final step, over a fixed set of masked batches (tcd_ds.data.loader)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], every: int, final_step: int):
        self.batches, self.every, self.final_step = batches, every, final_step

    def should_run(self, step: int) -> bool:
        return step % self.every == 0 or step == self.final_step

    def __call__(self, engine) -> dict[str, float]:
        sums = mlm_sums(engine, self.batches, engine.device)
        dist.all_reduce(sums)
        count = max(sums[2].item(), 1.0)
        return {"val/loss/mlm": sums[0].item() / count, "val/accuracy": sums[1].item() / count}
