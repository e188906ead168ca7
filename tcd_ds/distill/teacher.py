"""The frozen dense teacher: found, checked against the student, loaded, cut to the distilled layers.

A teacher is an HF directory (`config.json`, weights, tokenizer), a dense run of ours (`spec.yaml`,
`tokenizer/`, `checkpoints/<tag>/mp_rank_00_model_states.pt`), that run's `checkpoints/` directory or one tag
directory in it. The checks read configs and tokenizers only, so a spec can be rejected before any process
group starts or any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import yaml
from torch import nn
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerBase

from tcd_ds.data.tokenizer import load_tokenizer
from tcd_ds.models import bert_config, build_model
from tcd_ds.spec import DistillSpec, ModelSpec, RunSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's config, tokenizer and weights are. `weights` is None for an HF directory."""

    config_dir: Path  # the HF directory, or the run directory holding spec.yaml and tokenizer/
    weights: Path | None


def locate_teacher(path: str | Path, tag: str | None) -> TeacherSource:
    path = Path(path)
    if (path / "config.json").is_file():
        if tag is not None:
            raise ValueError(f"distill.teacher_tag ({tag}) is set but distill.teacher {path} is an HF directory")
        return TeacherSource(path, None)
    if (path / MODEL_STATES).is_file():  # one tag directory: RUN/checkpoints/TAG
        if tag is not None and tag != path.name:
            raise ValueError(f"distill.teacher_tag ({tag}) disagrees with the tag directory distill.teacher {path}")
        return TeacherSource(path.parent.parent, path / MODEL_STATES)
    if (path / "spec.yaml").is_file():
        run_dir, checkpoints = path, path / "checkpoints"
    elif (path / "latest").is_file() or tag is not None:
        run_dir, checkpoints = path.parent, path
    else:
        raise ValueError(
            f"distill.teacher {path} is neither an HF directory (config.json), a run directory (spec.yaml) nor a "
            "DeepSpeed checkpoint directory (latest)"
        )
    if tag is None:
        if not (checkpoints / "latest").is_file():
            raise ValueError(
                f"distill.teacher: no checkpoint in {checkpoints} (no `latest` file); set distill.teacher_tag"
            )
        tag = (checkpoints / "latest").read_text().strip()
    weights = checkpoints / tag / MODEL_STATES
    if not weights.is_file():
        raise ValueError(f"distill.teacher_tag: no {MODEL_STATES} in {checkpoints / tag}")
    return TeacherSource(run_dir, weights)


def run_model_spec(run_dir: Path) -> ModelSpec:
    """The model section of a run's resolved spec; the rest (data paths) need not be valid here."""
    spec_file = run_dir / "spec.yaml"
    if not spec_file.is_file():
        raise ValueError(f"distill.teacher: {spec_file} not found; a DeepSpeed teacher must sit in one of our run dirs")
    model = ModelSpec.model_validate(yaml.safe_load(spec_file.read_text())["model"])
    if model.moe is not None:
        raise ValueError(f"distill.teacher: {run_dir} is an MoE run; the teacher must be dense")
    return model


def teacher_config(source: TeacherSource) -> tuple[BertConfig, PreTrainedTokenizerBase]:
    """The teacher's BertConfig and tokenizer, without reading weights."""
    if source.weights is None:
        return BertConfig.from_pretrained(source.config_dir), load_tokenizer(source.config_dir)
    tokenizer = load_tokenizer(source.config_dir / "tokenizer")
    # Our runs build the model with vocab_size=len(tokenizer) (tcd_ds/train/trainer.py).
    return bert_config(run_model_spec(source.config_dir), len(tokenizer), tokenizer.pad_token_id), tokenizer


def compatibility_problems(
    teacher: BertConfig,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student: BertConfig,
    student_tokenizer: PreTrainedTokenizerBase | None,
    layers_needed: int,
) -> list[str]:
    """What stops the teacher's representations from lining up with the student's, one line per field
    (the tokenizers are compared when the student's is known)."""
    problems = [
        f"{field}: teacher has {getattr(teacher, field)}, student has {getattr(student, field)}"
        for field in ("hidden_size", "num_attention_heads", "vocab_size")
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
) -> BertConfig:
    """The teacher's config, or a ValueError naming each mismatched field (the launcher exits 2 on it).
    Reads no weights."""
    config, tokenizer = teacher_config(locate_teacher(distill.teacher, distill.teacher_tag))
    problems = compatibility_problems(config, tokenizer, student_config, student_tokenizer, layers_needed)
    if problems:
        raise TeacherMismatch(
            f"distill.teacher {distill.teacher} does not fit the student:\n  " + "\n  ".join(problems)
        )
    return config


def check_teacher_fits_spec(spec: RunSpec) -> None:
    """The checks that the spec alone allows, before any process starts: shapes and vocabulary size (and the
    vocabulary itself when the student's tokenizer is given by path; else it is compared once trained)."""
    from tcd_ds.distill.taps import TapPlan

    teacher = teacher_config(locate_teacher(spec.distill.teacher, spec.distill.teacher_tag))[0]
    tokenizer = load_tokenizer(spec.data.tokenizer.path) if spec.data.tokenizer.path else None
    vocab_size = len(tokenizer) if tokenizer else spec.data.tokenizer.vocab_size
    student = bert_config(spec.model, vocab_size, pad_token_id=0)
    shared = min(spec.model.num_layers, teacher.num_hidden_layers)
    check_teacher_compatible(spec.distill, student, tokenizer, TapPlan.from_spec(spec.distill, shared).layers_needed())


def load_weights(source: TeacherSource, config: BertConfig) -> BertForMaskedLM:
    if source.weights is None:
        return BertForMaskedLM.from_pretrained(source.config_dir, local_files_only=True)
    model = build_model(
        run_model_spec(source.config_dir), vocab_size=config.vocab_size, pad_token_id=config.pad_token_id
    )
    model.load_state_dict(torch.load(source.weights, map_location="cpu", weights_only=True)["module"])
    return model


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
    config = check_teacher_compatible(distill, student_config, student_tokenizer, layers_needed)
    bert = load_weights(locate_teacher(distill.teacher, distill.teacher_tag), config).bert
    bert.encoder.layer = bert.encoder.layer[:layers_needed]
    bert.config.num_hidden_layers = layers_needed
    bert.pooler = None
    bert.eval().requires_grad_(False).to(device)
    return deepspeed.init_inference(bert, dtype=DTYPES[distill.teacher_dtype], replace_with_kernel_inject=False)
