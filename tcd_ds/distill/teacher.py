"""The frozen dense teacher: found, checked against the student, loaded, cut to the distilled layers.

A teacher is an HF directory (`config.json`, weights, tokenizer) or a dense run of ours: its run directory, its
`checkpoints/` directory or one tag directory in it (tcd_ds.rundir), whose checkpoint must be complete (sealed
by its manifest, whose files are verified when it is located, so an incomplete one is refused before any
process group starts). The checks read configs, tokenizers and the checkpoint's own spec, not weights. Only what
the enabled relations need must match: the depth, the head count when attention relations are on, and the
tokenizer; the width may differ (each model's cosines are computed in its own width). A run's weights are read the
way the converter reads them: fp32 as trained, or the fp32 master weights of a bf16/fp16 run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerBase

from tcd_ds.data.tokenizer import load_tokenizer
from tcd_ds.models.configs import bert_config
from tcd_ds.rundir import Checkpoint, CheckpointError, locate_checkpoint
from tcd_ds.rundir.weights import full_state_dict
from tcd_ds.spec import DistillSpec, ModelSpec, RunSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's config, tokenizer and weights are: an HF directory, or a checkpoint of a dense run."""

    hf_dir: Path | None = None
    checkpoint: Checkpoint | None = None
    run_spec: dict | None = None  # the spec the checkpoint was written under (a run's checkpoint only)
    model: ModelSpec | None = None

    def config(self) -> tuple[BertConfig, PreTrainedTokenizerBase]:
        """The teacher's BertConfig and tokenizer, without reading weights."""
        if self.hf_dir is not None:
            return BertConfig.from_pretrained(self.hf_dir), load_tokenizer(self.hf_dir)
        tokenizer = self.checkpoint.load_tokenizer()
        # Our runs build the model with vocab_size=len(tokenizer) (tcd_ds/train/trainer.py).
        return bert_config(self.model, len(tokenizer), tokenizer.pad_token_id), tokenizer

    def weights(self, config: BertConfig) -> BertForMaskedLM:
        if self.hf_dir is not None:
            return BertForMaskedLM.from_pretrained(self.hf_dir, local_files_only=True)
        dtype = (self.run_spec.get("train") or {}).get("dtype", "fp32")
        model = BertForMaskedLM(config)
        model.load_state_dict(full_state_dict(self.checkpoint, self.model, dtype)[0])
        return model


def locate_teacher(path: str | Path, tag: str | None) -> TeacherSource:
    path = Path(path)
    if (path / "config.json").is_file():
        if tag is not None:
            raise ValueError(f"distill.teacher_tag ({tag}) is set but distill.teacher {path} is an HF directory")
        return TeacherSource(hf_dir=path)
    try:
        checkpoint = locate_checkpoint(path, tag)
        run_spec, model = checkpoint.read_spec()
    except CheckpointError as e:
        field = "distill.teacher_tag" if tag is not None and str(e).startswith("unknown tag") else "distill.teacher"
        raise ValueError(
            f"{field}: {path} is neither an HF directory (config.json) nor a usable run of ours: {e}"
        ) from None
    if model.moe is not None:
        raise ValueError(f"distill.teacher: {checkpoint.run_dir} is an MoE run; the teacher must be dense")
    return TeacherSource(checkpoint=checkpoint, run_spec=run_spec, model=model)


def compatibility_problems(
    teacher: BertConfig,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student: BertConfig,
    student_tokenizer: PreTrainedTokenizerBase | None,
    layers_needed: int,
    per_head: bool = True,
) -> list[str]:
    """What stops the teacher's representations from lining up with the student's, one line per field
    (the tokenizers are compared when the student's is known). The widths may differ; the head counts must
    match only for per-head (attention) relations."""
    fields = ("num_attention_heads", "vocab_size") if per_head else ("vocab_size",)
    problems = [
        f"{field}: teacher has {getattr(teacher, field)}, student has {getattr(student, field)}"
        for field in fields
        if getattr(teacher, field) != getattr(student, field)
    ]
    if teacher.num_hidden_layers != student.num_hidden_layers:  # TCD pairs layer i with layer i
        problems.append(
            f"num_hidden_layers: teacher has {teacher.num_hidden_layers}, student has {student.num_hidden_layers}"
        )
    elif teacher.num_hidden_layers < layers_needed:
        problems.append(
            f"num_hidden_layers: teacher has {teacher.num_hidden_layers}, the distilled layers need {layers_needed}"
        )
    if student_tokenizer is None:
        return problems
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda item: item[1])
        problems.append(f"tokenizer: vocabularies differ in {len(differ)} (token, id) entries, e.g. {differ[:3]}")
    return problems


class TeacherMismatch(ValueError):
    """The teacher cannot teach this student; the launcher reports it and exits 2."""


def check_teacher_compatible(
    distill: DistillSpec,
    student_config: BertConfig,
    student_tokenizer: PreTrainedTokenizerBase | None,
    layers_needed: int,
    source: TeacherSource | None = None,
) -> BertConfig:
    """The teacher's config, or a ValueError naming each mismatched field (the launcher exits 2 on it).
    Reads no weights. `source`: the teacher, if already located."""
    source = source or locate_teacher(distill.teacher, distill.teacher_tag)
    config, tokenizer = source.config()
    problems = compatibility_problems(config, tokenizer, student_config, student_tokenizer, layers_needed,
                                      per_head=distill.attention.enabled)
    if problems:
        raise TeacherMismatch(
            f"distill.teacher {distill.teacher} does not fit the student:\n  " + "\n  ".join(problems)
        )
    return config


def check_teacher_fits_spec(spec: RunSpec) -> None:
    """The checks that the spec alone allows, before any process starts: shapes and vocabulary size (and the
    vocabulary itself when the student's tokenizer is given by path; else it is compared once trained)."""
    from tcd_ds.distill.taps import TapPlan

    tokenizer = load_tokenizer(spec.data.tokenizer.path) if spec.data.tokenizer.path else None
    vocab_size = len(tokenizer) if tokenizer else spec.data.tokenizer.vocab_size
    student = bert_config(spec.model, vocab_size, pad_token_id=0)
    layers_needed = TapPlan.from_spec(spec.distill, spec.model.num_layers).layers_needed()
    check_teacher_compatible(spec.distill, student, tokenizer, layers_needed)


def load_teacher(
    distill: DistillSpec,
    student_config: BertConfig,
    student_tokenizer: PreTrainedTokenizerBase,
    layers_needed: int,
    device: torch.device | str,
) -> nn.Module:
    """The teacher's encoder (no MLM head, no pooler) up to the last distilled layer, frozen, in eval mode,
    wrapped by `deepspeed.init_inference`. Kernel injection stays off on every device: it fuses each BertLayer
    into one op, which removes the submodules the taps hook (and raises on CPU)."""
    source = locate_teacher(distill.teacher, distill.teacher_tag)  # once per launch
    config = check_teacher_compatible(distill, student_config, student_tokenizer, layers_needed, source)
    bert = source.weights(config).bert
    bert.encoder.layer = bert.encoder.layer[:layers_needed]
    bert.config.num_hidden_layers = layers_needed
    bert.pooler = None
    bert.eval().requires_grad_(False).to(device)
    return deepspeed.init_inference(bert, dtype=DTYPES[distill.teacher_dtype], replace_with_kernel_inject=False)
