"""The TCD side of a training step: the frozen teacher, taps on both models, and the relation losses."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from tcd_ds.data.loader import seeded_generator
from tcd_ds.distill.relations import RelationDistiller
from tcd_ds.distill.taps import TapPlan, Taps
from tcd_ds.distill.teacher import load_teacher, locate_teacher, teacher_config
from tcd_ds.spec import RunSpec


class Distillation:
    def __init__(self, teacher: nn.Module, student: nn.Module, distiller: RelationDistiller, seed: int, rank: int):
        self.teacher = teacher
        self.distiller = distiller
        self.student_taps = Taps(student, distiller.plan)
        self.teacher_taps = Taps(teacher, distiller.plan)
        self.seed, self.rank = seed, rank

    @classmethod
    def build(
        cls, spec: RunSpec, student: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device, rank: int
    ) -> Distillation:
        d = spec.distill
        student_config = student.config
        teacher_layers = teacher_config(locate_teacher(d.teacher, d.teacher_tag))[0].num_hidden_layers
        plan = TapPlan.from_spec(d, min(student_config.num_hidden_layers, teacher_layers))
        teacher = load_teacher(d, student_config, tokenizer, plan.layers_needed(), device)
        distiller = RelationDistiller(d, plan, student_config.num_attention_heads)
        return cls(teacher, student, distiller, spec.seed, rank)

    @torch.no_grad()
    def teacher_forward(self, batch: dict[str, torch.Tensor]) -> None:
        """Fills the teacher's taps; run before the student so both captures are there for the relations."""
        self.teacher_taps.clear()
        self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def relation_losses(self, attention_mask: torch.Tensor, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Unweighted relation loss per enabled location, for the student forward that just ran. Positions
        are drawn from (seed, step, micro-batch, rank): distinct per rank, the same after a resume."""
        positions = seeded_generator(self.seed, "positions", step, micro, self.rank)
        losses = self.distiller(self.student_taps.captures, self.teacher_taps.captures, attention_mask, positions)
        self.student_taps.clear()
        self.teacher_taps.clear()
        return losses

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.distiller.weighted_sum(losses)
