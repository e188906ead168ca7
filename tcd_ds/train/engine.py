"""The distillation engine: one optimizer step of the student, with or without a teacher."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from tcd_ds.spec import RunSpec

Batch = dict[str, torch.Tensor]


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the labelled tokens, for the MLM head to run at those only (`MaskedMLMHead`)."""
    return labels.reshape(-1).ne(-100).nonzero().squeeze(1)


class DistillationEngine:
    """Wraps the student's DeepSpeed engine and, for TCD, the frozen teacher and the relation losses.

    A step runs grad-accumulation micro-batches of: teacher forward (no autograd), student forward, loss
    assembly `mlm + a * balance + sum_loc b_loc * relation_loc`, `engine.backward`, `engine.step` (DeepSpeed
    only updates at the accumulation boundary). Without a teacher it is dense or MoE-baseline pre-training.

    Nothing in a step waits on the device: what needs data-dependent shapes (the masked positions, the sampled
    relation positions) is computed from the batch while it is still on the host, and the loss terms are
    returned as device tensors.
    """

    def __init__(self, engine, spec: RunSpec, distillation=None):
        self.engine = engine
        self.balance_weight = spec.model.moe.balance_weight if spec.model.moe else None
        self.distillation = distillation

    def step(self, micro_batches: list[Batch], step: int) -> dict[str, torch.Tensor]:
        """Returns the loss terms of this step, detached and averaged over micro-batches, on device: reading
        them forces a host-device sync, so the trainer does that only at log intervals."""
        terms: dict[str, torch.Tensor] = defaultdict(float)
        for micro, host_batch in enumerate(micro_batches):
            losses = self.losses(host_batch, step, micro)
            self.engine.backward(losses["total"])
            self.engine.step()
            for name, value in losses.items():
                terms[name] = terms[name] + value.detach() / len(micro_batches)
        return dict(terms)

    def losses(self, host_batch: Batch, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch, given as it comes from the loader (on the host)."""
        device = self.engine.device
        batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
        if self.distillation is not None:
            self.distillation.teacher_forward(batch)
        positions = masked_positions(host_batch["labels"]).to(device, non_blocking=True)
        head = self.engine.module.cls  # MaskedMLMHead: logits at the masked tokens only
        head.positions = positions
        try:
            logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            head.positions = None
        mlm = F.cross_entropy(logits, batch["labels"].reshape(-1).index_select(0, positions))  # HF's MLM loss
        losses = {"mlm": mlm}
        total = mlm
        if self.balance_weight is not None:
            losses["balance"] = self.engine.module.balance_loss()
            total = total + self.balance_weight * losses["balance"]
        if self.distillation is not None:
            relations = self.distillation.relation_losses(host_batch["attention_mask"], step, micro)
            losses.update(relations)
            total = total + self.distillation.weighted_sum(relations)
        losses["total"] = total
        return losses
