"""The run spec: one YAML file that says everything about a run.

Every section forbids unknown keys, because DeepSpeed silently ignores a misspelt key and a run that trains
with a setting the user never got is worse than one that refuses to start. The schema is pure (it reads no file
but the spec): what needs the world size or the file system is checked by tcd_ds/checks.py, before any process
group starts. The DeepSpeed config is generated from it (tcd_ds/train/ds_config.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, ValidationInfo, field_validator,
    model_validator,
)

from tcd_ds.resources import bundled_path, find_file, portable_path

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Dtype = Literal["fp32", "bf16", "fp16"]
RelationLocation = Literal["trunk", "residual_inner", "attention"]
RELATION_LOCATIONS: tuple[RelationLocation, ...] = ("trunk", "residual_inner", "attention")  # DistillSpec fields
# A path, or `bundled:REL` for a file the package ships: absolute once validated, `bundled:REL` again when dumped.
DataPath = Annotated[str, AfterValidator(bundled_path), PlainSerializer(portable_path)]


class Section(BaseModel):
    # Every float of the spec must be finite: an `inf` weight or `nan` rate would be accepted, then train badly.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _one_value_is_a_list_of_one(cls, value: Any, info: ValidationInfo) -> Any:
        """`--seeds 1` or `train: file.txt` where a list is expected: a list of that one value."""
        annotation = cls.model_fields[info.field_name].annotation
        kinds = [annotation] if get_origin(annotation) is list else \
            [t for t in get_args(annotation) if t is not type(None)]  # X | None
        only_lists = bool(kinds) and all(get_origin(t) is list for t in kinds)
        return [value] if only_lists and isinstance(value, (str, int, float)) else value


class MoESpec(Section):
    """Which FFNs become DeepSpeed-MoE layers, and how they route."""

    layers: Literal["every", "every_other"] | list[NonNegativeInt] = "every_other"
    num_experts: PositiveInt = 4
    ep_size: PositiveInt = 1
    capacity_factor: Annotated[float, Field(gt=0)] = 1.25
    eval_capacity_factor: Annotated[float, Field(gt=0)] = 2.0
    min_capacity: NonNegativeInt = 4
    drop_tokens: bool = True
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = None
    balance_loss: Literal["switch", "kl_uniform"] = "switch"
    balance_weight: Annotated[float, Field(ge=0)] = 0.01

    def layer_ids(self, num_layers: int) -> list[int]:
        if self.layers == "every":
            return list(range(num_layers))
        if self.layers == "every_other":
            return list(range(1, num_layers, 2))
        return sorted(set(self.layers))

    @model_validator(mode="after")
    def _experts_split_evenly(self) -> MoESpec:
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by ep_size ({self.ep_size}): "
                "each expert-parallel rank holds num_experts / ep_size experts"
            )
        return self


class ModelSpec(Section):
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 512
    max_position: PositiveInt = 512
    dropout: Probability = 0.1
    attention_dropout: Probability = 0.1
    moe: MoESpec | None = None

    @model_validator(mode="after")
    def _shapes_line_up(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.moe is not None:
            bad = [i for i in self.moe.layer_ids(self.num_layers) if i >= self.num_layers]
            if bad:
                raise ValueError(f"moe.layers {bad} out of range for num_layers={self.num_layers}")
            if not self.moe.layer_ids(self.num_layers):
                raise ValueError("moe.layers selects no layer (every_other with num_layers=1?)")
        return self


class HubDatasetSpec(Section):
    """A hub dataset, used when online; local files are the default."""

    name: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"


class TokenizerSpec(Section):
    path: DataPath | None = Field(None, description="An HF tokenizer directory to use instead of training one")
    vocab_size: Annotated[int, Field(ge=100)] = 8000


class DataSpec(Section):
    train: list[DataPath] = Field(["bundled:wiki/train.txt"], validate_default=True)
    validation: list[DataPath] = Field(["bundled:wiki/validation.txt"], validate_default=True)
    hub: HubDatasetSpec | None = None
    seq_len: Annotated[int, Field(ge=8)] = 128
    mask_prob: Annotated[float, Field(gt=0, lt=1)] = 0.15
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    cache_dir: str = ".cache/tcd_ds"

    @model_validator(mode="after")
    def _some_training_text(self) -> DataSpec:
        if not self.hub and not self.train:
            raise ValueError("data.train is empty and no data.hub dataset is given")
        return self


class OptimSpec(Section):
    lr: Annotated[float, Field(gt=0)] = 5e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[Probability, Probability] = (0.9, 0.98)
    eps: Annotated[float, Field(gt=0)] = 1e-6
    warmup_steps: NonNegativeInt = 100
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: Probability = 0.0
    grad_clip: Annotated[float, Field(ge=0)] = 1.0


class TrainSpec(Section):
    steps: PositiveInt = 1000
    global_batch_size: PositiveInt = 32
    micro_batch_size: PositiveInt = 16
    dtype: Dtype = "fp32"
    steps_per_launch: PositiveInt | None = Field(
        None, description="End a launch after this many steps (preemptible slots): the schedule is still that "
        "of train.steps, and relaunching the same command trains the next chunk"
    )
    max_skipped_steps: PositiveInt = Field(
        5, description="Consecutive steps with a non-finite loss or gradient (skipped, not applied) after which "
        "the run stops; the last good checkpoint is kept"
    )
    eval_every: PositiveInt = 100
    eval_batches: PositiveInt = 8
    deterministic: bool = Field(
        False, description="Bitwise-reproducible CUDA runs (torch.use_deterministic_algorithms, cuBLAS workspace "
        "config), at some speed; CPU runs are reproducible without it (README: exact resume)"
    )

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainSpec:
        grad_accum_steps(self.global_batch_size, self.micro_batch_size, world_size=1)
        return self


class ParallelSpec(Section):
    zero_stage: Annotated[int, Field(ge=0)] = 2
    overlap_comm: bool | None = Field(
        None, description="Overlap ZeRO's gradient reduction with the backward; default: on with an accelerator "
        "(CUDA streams), off on CPU, where gloo has nothing to overlap with"
    )
    reduce_bucket_size: PositiveInt | None = Field(
        None, description="ZeRO gradient elements per reduction; default by accelerator (tcd_ds/train/ds_config.py)"
    )
    allgather_bucket_size: PositiveInt | None = Field(
        None, description="ZeRO parameter elements per all-gather after the step; default by accelerator"
    )
    timeout_minutes: float = Field(
        30, gt=0, allow_inf_nan=False, description="how long a collective waits for the slowest rank before the job ends")

    @field_validator("zero_stage")
    @classmethod
    def _zero_at_most_2(cls, stage: int) -> int:
        if stage > 2:
            raise ValueError(f"ZeRO stage {stage} is not supported: DeepSpeed-MoE refuses ZeRO-3; use 0, 1 or 2")
        return stage


class CheckpointSpec(Section):
    every: PositiveInt = 500
    keep_last: PositiveInt = 2


class WandbSpec(Section):
    enabled: bool = False
    project: str = "tcd-ds"
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    tags: list[str] = []
    group: str | None = None


class LoggingSpec(Section):
    every: PositiveInt = 10
    progress_bar: bool = True
    wandb: WandbSpec = Field(default_factory=WandbSpec)


class RelationSpec(Section):
    enabled: bool = True
    weight: Annotated[float, Field(ge=0)] = 1.0
    layers: Literal["all"] | list[NonNegativeInt] = "all"


class AttentionRelationSpec(RelationSpec):
    vectors: Literal["context", "query", "key", "value"] = "context"


class DistillSpec(Section):
    """The frozen teacher and the three relational losses of TCD (README: the method, as configured)."""

    teacher: str = Field(description="A teacher run dir of ours, a DeepSpeed checkpoint dir or an HF directory")
    teacher_tag: str | None = None
    teacher_dtype: Dtype = "fp32"
    num_positions: Annotated[int, Field(ge=2)] = 64
    scope: Literal["global", "local"] = "global"
    trunk: RelationSpec = Field(default_factory=RelationSpec)
    residual_inner: RelationSpec = Field(default_factory=RelationSpec)
    attention: AttentionRelationSpec = Field(default_factory=lambda: AttentionRelationSpec(enabled=False))

    @model_validator(mode="after")
    def _something_to_distil(self) -> DistillSpec:
        if not any(getattr(self, location).enabled for location in RELATION_LOCATIONS):
            raise ValueError(
                "every relation location (trunk, residual_inner, attention) is disabled: nothing to distil; "
                "enable one, or leave distill out to train the MoE baseline"
            )
        return self


class RunSpec(Section):
    run_dir: str = "runs/default"
    seed: int = 1234
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    distill: DistillSpec | None = None

    @model_validator(mode="after")
    def _cross_section(self) -> RunSpec:
        if self.data.seq_len > self.model.max_position:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_position ({self.model.max_position})"
            )
        moe = self.model.moe
        tokens = self.train.micro_batch_size * self.data.seq_len
        if moe is not None and moe.min_capacity > tokens:
            raise ValueError(
                f"model.moe.min_capacity ({moe.min_capacity}) exceeds the tokens of one micro-batch ({tokens})"
            )
        if self.distill is not None and moe is None:
            raise ValueError("distill is set but model.moe is not: TCD distils into an MoE student")
        if self.distill is not None and self.train.micro_batch_size * self.data.seq_len < self.distill.num_positions:
            raise ValueError(f"distill.num_positions ({self.distill.num_positions}) exceeds the tokens of a micro-batch")
        return self


def has_field(model: type[BaseModel], dotted: str) -> bool:
    """Whether `section.key` names a field of `model` (through nested sections, optional or not)."""
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = next((t for t in (get_args(annotation) or (annotation,))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return True


def grad_accum_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank and optimizer step; the global batch must split evenly over them."""
    per_micro_step = micro_batch_size * world_size
    if global_batch_size % per_micro_step:
        raise ValueError(
            f"train.global_batch_size ({global_batch_size}) must be a multiple of train.micro_batch_size x world "
            f"size ({micro_batch_size} x {world_size} = {per_micro_step}; {global_batch_size} is not divisible by "
            f"it): gradient accumulation = global / (micro x world size)"
        )
    return global_batch_size // per_micro_step


class SpecError(Exception):
    """A run spec that cannot run; each line names a field and what is wrong with it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        problems.append(f"{loc or '<spec>'}: {msg}{shown}")
    return problems


def parse_override_value(raw: str) -> Any:
    """Values stay strings for pydantic to parse by the field's type ("3e-4" -> float, "False" -> bool);
    only lists, mappings and null need YAML."""
    text = raw.strip()
    if text[:1] in "[{" or text.lower() in ("null", "none", "~"):
        return yaml.safe_load(text)
    return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply W&B-style `--dotted.key=value` arguments to the raw spec dict."""
    problems = []
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            problems.append(f"{arg}: override must look like --section.key=value")
            continue
        key, raw = arg[2:].split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = parse_override_value(raw)
    if problems:
        raise SpecError(problems)
    return data


def as_overrides(section: BaseModel, exclude: set[str] = frozenset()) -> list[str]:
    """A section's fields as `--key=value` arguments that `apply_overrides` reads back to the same values: how a
    command starts another with its settings, on a command line a user can copy."""
    args = []
    for key, value in section.model_dump(mode="json", exclude=set(exclude)).items():
        text = value if isinstance(value, str) else json.dumps(value)
        if isinstance(value, str) and parse_override_value(value) != value:
            text = json.dumps(value)  # a string YAML would read as something else
        args.append(f"--{key}={text}")
    return args


def read_yaml_mapping(path: str | os.PathLike, what: str = "spec file") -> dict:
    """A YAML file's top-level mapping, or a SpecError saying what is wrong with the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SpecError([f"{what} not found: {path}"]) from None
    except IsADirectoryError:
        raise SpecError([f"{what} {path} is a directory; give a YAML file"]) from None
    except OSError as e:
        raise SpecError([f"{what} {path} cannot be read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{what} {path} is not UTF-8 text (byte {e.start}): not a YAML file?"]) from None
    except yaml.YAMLError as e:
        raise SpecError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: top level must be a mapping of sections"])
    return data


def find_spec_file(name_or_path: str | os.PathLike, kind: str = "spec") -> Path:
    """A spec file's path: the path given, or the shipped one of that name (tcd_ds/resources.py); a SpecError
    naming both when neither exists."""
    try:
        return find_file(name_or_path, kind)
    except FileNotFoundError as e:
        raise SpecError([str(e)]) from None


def validate(model: type[BaseModel], data: dict):
    """`model` validated from a raw mapping, or a SpecError with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e)) from None


def load_spec(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunSpec:
    """Read a YAML spec (a path or a shipped spec's name; None: only defaults), apply overrides, validate: a
    RunSpec or a SpecError."""
    data = read_yaml_mapping(find_spec_file(path)) if path is not None else {}
    return validate(RunSpec, apply_overrides(data, list(overrides)))


def dump_spec(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
