"""The distillation engine: one optimizer step of the student, with or without a teacher."""

from __future__ import annotations

from collections import defaultdict

import torch

from tcd_ds.spec import RunSpec


class DistillationEngine:
    """Wraps the student's DeepSpeed engine and, for TCD, the frozen teacher and the relation losses.

    A step runs grad-accumulation micro-batches of: teacher forward (no autograd), student forward, loss
    assembly `mlm + a * balance + sum_loc b_loc * relation_loc`, `engine.backward`, `engine.step` (DeepSpeed
    only updates at the accumulation boundary). Without a teacher it is dense or MoE-baseline pre-training.
    """

    def __init__(self, engine, spec: RunSpec, distillation=None):
        self.engine = engine
        self.balance_weight = spec.model.moe.balance_weight if spec.model.moe else None
        self.distillation = distillation

    def step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        """Returns the loss terms of this step, detached and averaged over micro-batches, on device: reading
        them forces a host-device sync, so the trainer does that only at log intervals."""
        terms: dict[str, torch.Tensor] = defaultdict(float)
        for micro, batch in enumerate(micro_batches):
            batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}
            losses = self.losses(batch, step, micro)
            self.engine.backward(losses["total"])
            self.engine.step()
            for name, value in losses.items():
                terms[name] = terms[name] + value.detach() / len(micro_batches)
        return dict(terms)

    def losses(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor]:
        if self.distillation is not None:
            self.distillation.teacher_forward(batch)
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        losses = {"mlm": out.loss}
        total = out.loss
        if self.balance_weight is not None:
            losses["balance"] = self.engine.module.balance_loss()
            total = total + self.balance_weight * losses["balance"]
        if self.distillation is not None:
            relations = self.distillation.relation_losses(batch["attention_mask"], step, micro)
            losses.update(relations)
            total = total + self.distillation.weighted_sum(relations)
        losses["total"] = total
        return losses
