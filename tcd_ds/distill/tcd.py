"""The TCD loss of one student micro-batch (README: the method, as configured):

    L = L_mlm + a * L_balance + sum_loc b_loc * L_rel(loc)

The first two terms are the student's own loss, returned by its forward (the HF MoE contract: `loss` includes
`balance_weight * aux_loss`); this module adds the relational terms, computed between the taps of the frozen
teacher and of the student on the same micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from tcd_ds.distill.relations import RelationDistiller
from tcd_ds.distill.taps import TapPlan, Taps
from tcd_ds.distill.teacher import load_teacher
from tcd_ds.spec import RunSpec


class TCD:
    """The frozen teacher, taps on both models, and the relation losses."""

    def __init__(self, teacher: nn.Module, student: nn.Module, distiller: RelationDistiller):
        self.teacher = teacher
        self.distiller = distiller
        self.student_taps = Taps(student, distiller.plan)
        self.teacher_taps = Taps(teacher, distiller.plan)

    @classmethod
    def build(cls, spec: RunSpec, student: nn.Module, tokenizer: PreTrainedTokenizerBase,
              device: torch.device) -> TCD:
        d = spec.distill
        plan = TapPlan.from_spec(d, student.config.num_hidden_layers)  # the teacher's depth is checked equal
        teacher = load_teacher(d, student.config, tokenizer, plan.layers_needed(), device)
        return cls(teacher, student, RelationDistiller(d, plan, student.config.num_attention_heads))

    @torch.no_grad()
    def teacher_forward(self, batch: dict[str, torch.Tensor]) -> None:
        """Fills the teacher's taps; run before the student's forward so both captures are there."""
        self.teacher_taps.clear()
        self.teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def relation_losses(self, attention_mask: torch.Tensor | None,
                        positions: torch.Generator) -> dict[str, torch.Tensor]:
        """Unweighted relation loss per enabled location, for the student forward that just ran; `positions`
        draws the sampled token positions (it must differ across ranks)."""
        losses = self.distiller(self.student_taps.captures, self.teacher_taps.captures, attention_mask, positions)
        self.student_taps.clear()
        self.teacher_taps.clear()
        return losses

    def loss(self, student_loss: torch.Tensor, attention_mask: torch.Tensor | None,
             positions: torch.Generator) -> dict[str, torch.Tensor]:
        """Each relation term (unweighted) and `total`: the student's loss plus the weighted relation terms."""
        relations = self.relation_losses(attention_mask, positions)
        return {**relations, "total": student_loss + self.distiller.weighted_sum(relations)}
