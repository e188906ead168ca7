"""One optimizer step of the student: dense, MoE baseline or TCD alike."""

from __future__ import annotations

from collections import defaultdict

import torch

from tcd_ds.data.loader import seeded_generator
from tcd_ds.distill.tcd import TCD

Batch = dict[str, torch.Tensor]


class TrainStep:
    """Grad-accumulation micro-batches of: teacher forward (TCD, no autograd), student forward (its `loss` is
    MLM + weighted balance), the TCD loss, `engine.backward`, `engine.step` (DeepSpeed only updates at the
    accumulation boundary).

    Nothing in a step reads a device tensor on the host: what has a data-dependent shape comes with the batch (the
    masked positions, an attention mask only where there is padding: `tcd_ds.data.mlm.mlm_batch`), the relation
    positions are drawn without looking at the data (with padding: from the host copy of the mask), and the loss
    terms are returned as device tensors (tests/test_host_syncs.py counts the step's host reads).
    """

    def __init__(self, engine, tcd: TCD | None, seed: int, rank: int):
        self.engine = engine
        self.tcd = tcd
        self.seed, self.rank = seed, rank

    def __call__(self, micro_batches: list[Batch], step: int) -> dict[str, torch.Tensor]:
        """The loss terms of step `step`, detached and averaged over micro-batches, on device: reading them forces
        a host-device sync, so the trainer does that only at log intervals. Relation positions are drawn from
        (seed, step, micro-batch, rank): distinct per rank, the same after a resume."""
        terms: dict[str, torch.Tensor] = defaultdict(float)
        for micro, host_batch in enumerate(micro_batches):
            losses = self.losses(host_batch, seeded_generator(self.seed, "positions", step, micro, self.rank))
            self.engine.backward(losses["total"])
            self.engine.step()
            for name, value in losses.items():
                terms[name] = terms[name] + value.detach() / len(micro_batches)
        return dict(terms)

    def losses(self, host_batch: Batch, relation_positions: torch.Generator) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch, given as it comes from the loader (on the host)."""
        device = self.engine.device
        batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
        if self.tcd is not None:
            self.tcd.teacher_forward(batch)
        out = self.engine(**batch)
        losses = {"mlm": out.loss, "total": out.loss}
        if getattr(out, "aux_loss", None) is not None:  # an MoE student: its loss includes the balance term
            losses["balance"] = out.aux_loss
            losses["mlm"] = out.loss.detach() - self.engine.module.config.balance_weight * out.aux_loss.detach()
        if self.tcd is not None:
            losses.update(self.tcd.loss(out.loss, host_batch.get("attention_mask"), relation_positions))
        return losses
