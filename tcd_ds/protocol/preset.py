"""A protocol preset: which pre-training specs (with which overrides), fine-tuning tasks and seeds, probe text.

One YAML file (ds_configs/protocol_*.yaml) that reuses the pre-training presets with overrides rather than
copying them; like the run spec it refuses unknown keys and takes `--dotted.key=value` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from tcd_ds.rundir import RunDir
from tcd_ds.spec import (
    RELATION_LOCATIONS, DistillSpec, RelationLocation, RunSpec, Section, SpecError, apply_overrides, read_yaml_mapping,
)


class Pretraining(Section):
    """A pre-training run: a run spec with overrides, trained by the protocol, or an existing run directory of
    ours (`run`), used as it is."""

    spec: str | None = None
    overrides: list[str] = []
    run: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Pretraining:
        if (self.spec is None) == (self.run is None):
            raise ValueError("give a run spec (spec) or an existing run directory (run), not both or neither")
        source = Path(self.spec or self.run)
        if not source.exists():
            raise ValueError(f"{source} not found (relative to {os.getcwd()})")
        if self.run is not None and not RunDir(source).spec_file.is_file():
            raise ValueError(f"{source} is not a run directory of ours (no spec.yaml)")
        return self

    def raw_spec(self) -> dict:
        """The run's spec as a raw mapping: the spec file with the overrides applied, or the run's resolved spec."""
        if self.run is not None:
            return yaml.safe_load(RunDir(self.run).spec_file.read_text())
        return apply_overrides(yaml.safe_load(Path(self.spec).read_text()) or {}, self.overrides)


class Finetuning(Section):
    """launchers/finetune.py's settings (tcd_ds.downstream.finetune.FinetuneConfig), per task and mode."""

    tasks: Annotated[list[str], Field(min_length=1)] = ["data/tasks/movie_reviews"]
    modes: Annotated[list[Literal["full", "adapter"]], Field(min_length=1)] = ["full"]
    seeds: Annotated[list[int], Field(min_length=1)] = [1, 2, 3]
    epochs: Annotated[int, Field(gt=0)] = 5
    batch_size: Annotated[int, Field(gt=0)] = 32
    lr_full: Annotated[float, Field(gt=0)] = 1e-3
    lr_adapter: Annotated[float, Field(gt=0)] = 1e-3
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    adapter_size: Annotated[int, Field(gt=0)] = 64
    max_length: Annotated[int, Field(gt=0)] = 128
    max_train_examples: Annotated[int, Field(gt=0)] | None = None
    balance_weight: Annotated[float, Field(ge=0)] | None = Field(
        None, description="MoE load-balancing loss weight in fine-tuning; default: the run's; 0: off")
    selection: Literal["heldout", "dev", "last"] = Field(
        "heldout", description="the reported epoch: best on a slice held out from train, best on dev, or the last")
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    heldout_max_examples: Annotated[int, Field(gt=0)] = 1000
    eval_capacity_factor: Annotated[float, Field(gt=0)] | None = Field(
        None, description="MoE: expert capacity factor in evaluation; default: the converted model's")
    train_router: bool = Field(True, description="MoE, full mode: train the router (False: keep it as pre-trained)")


class Jobs(Section):
    """Fine-tunings and probes run side by side, one per slot (tcd_ds.protocol.slots); slots change no result."""

    slots: Annotated[int, Field(gt=0)] | None = Field(None, description="default: one per GPU; on CPU 1")
    threads: Annotated[int, Field(gt=0)] | None = Field(
        None, description="CPU cores (threads) per job; default: the node's cores / slots")
    pin: bool = Field(True, description="pin each job to its slot's cores (taskset)")


class Probe(Section):
    """Out-of-domain text for the MLM probe."""

    name: str = "nyt_editorials"
    files: Annotated[list[str], Field(min_length=1)] = ["data/tasks/nyt_editorials/sentences.txt"]
    seq_len: Annotated[int, Field(ge=8)] = 128
    cache_dir: str = ".cache/tcd_ds"


class Preset(Section):
    out_dir: str = "runs/protocol"
    deepspeed: list[str] = Field(["--num_gpus", "2"], description="arguments of the `deepspeed` runner")
    teacher: Pretraining
    moe: Pretraining
    tcd: Pretraining
    ablate: list[RelationLocation] = Field([], description="relation locations to drop one at a time (extra TCD runs)")
    scratch: bool = Field(True, description="a row with the teacher's shape and random weights, fine-tuned the same way")
    finetune: Finetuning = Field(default_factory=Finetuning)
    probe: Probe = Field(default_factory=Probe)
    jobs: Jobs = Field(default_factory=Jobs)

    @model_validator(mode="after")
    def _students_differ_only_by_distillation(self) -> Preset:
        """The comparison is fair only if the baseline is the TCD student without its teacher: same model, data,
        optimiser and step budget; and a given TCD run must have been distilled from the given teacher."""
        moe, tcd = self.moe.raw_spec(), self.tcd.raw_spec()
        if "distill" not in tcd:
            raise ValueError("tcd: the spec has no distill section")
        if "distill" in moe:
            raise ValueError("moe: the baseline has a distill section")
        differ = [s for s, (a, b) in zip(COMPARED, zip(comparable(moe), comparable(tcd))) if a != b]
        if differ:
            raise ValueError(f"moe and tcd must differ only by distillation; they differ in: {', '.join(differ)}")
        if self.tcd.run is not None:
            teacher = Path(tcd["distill"]["teacher"]).resolve()
            if self.teacher.run is None or teacher != Path(self.teacher.run).resolve():
                raise ValueError(f"tcd: the given run was distilled from {teacher}, which is not the teacher's run")
        disabled = [loc for loc in self.ablate if loc not in enabled_locations(tcd["distill"])]
        if disabled:
            raise ValueError(f"ablate: {disabled} not enabled in the TCD student, nothing to drop")
        alone = [loc for loc in self.ablate if not ablated_leaves_some(tcd["distill"], loc)]
        if alone:
            raise ValueError(f"ablate: without {alone[0]}, its only enabled location, the TCD student has nothing "
                             "to distil")
        return self


COMPARED = ("model", "data", "optim", "train", "seed")


def comparable(raw: dict) -> tuple:
    """What must match between the two students, resolved with the spec's defaults (the distill section is left
    out: its teacher may not exist yet); the data cache's location does not count."""
    try:
        spec = RunSpec.model_validate({k: v for k, v in raw.items() if k != "distill"})
    except ValidationError as e:
        raise ValueError(f"invalid student spec: {e}") from None
    dumped = spec.model_dump()
    dumped["data"].pop("cache_dir")
    return tuple(dumped[s] for s in COMPARED)


def enabled_locations(distill: dict) -> list[str]:
    """The relation locations a raw distill section turns on with a positive weight (the spec's defaults apply)."""
    resolved = DistillSpec.model_validate({**distill, "teacher": "."})  # the teacher is not needed here
    return [loc for loc in RELATION_LOCATIONS if getattr(resolved, loc).enabled and getattr(resolved, loc).weight > 0]


def ablated_leaves_some(distill: dict, location: str) -> bool:
    """Whether the raw distill section still enables a location once `location` is off (the spec's defaults apply)."""
    resolved = DistillSpec.model_validate({**distill, "teacher": "."})
    return any(getattr(resolved, loc).enabled for loc in RELATION_LOCATIONS if loc != location)


def load_preset(path: str | os.PathLike, overrides: list[str] = (), ablate: list[str] | None = None) -> Preset:
    """Read, override and validate a preset. `ablate` (the command line's) replaces the preset's list; empty, it
    means every location the TCD student has enabled."""
    data = read_yaml_mapping(path, "preset file")
    data = apply_overrides(data, list(overrides))
    try:
        preset = Preset.model_validate(data)
        if ablate is not None:
            data["ablate"] = list(ablate) or enabled_locations(preset.tcd.raw_spec()["distill"])
            preset = Preset.model_validate(data)
    except ValidationError as e:
        raise SpecError([
            f"{'.'.join(map(str, err['loc'])) or '<preset>'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        ]) from None
    return preset
