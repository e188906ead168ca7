"""A protocol preset: which pre-training specs (with which overrides), fine-tuning tasks and seeds, probe text.

One YAML file (a shipped preset by name, `--preset demo`, or a path) that reuses the pre-training specs with
overrides rather than copying them, and embeds the fine-tuning and probe commands' settings as they are; like the
run spec it refuses unknown keys and takes `--dotted.key=value` overrides. The schema is pure; `check_preset`
reads what the preset names (every stage's spec with its overrides, the tasks, the probe text) before the first
stage starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, model_validator

from tcd_ds.checks import check_files, check_spec, check_text_files
from tcd_ds.downstream.spec import FinetuneSettings, Mode, ProbeSettings
from tcd_ds.downstream.tasks import GLUE, TaskError, load_task
from tcd_ds.rundir import Checkpoint, RunDir
from tcd_ds.spec import (
    RELATION_LOCATIONS, RelationLocation, RunSpec, Section, SpecError, apply_overrides, find_spec_file,
    read_yaml_mapping, validate,
)


class Pretraining(Section):
    """A pre-training run: a run spec (a path or a shipped spec's name) with overrides, trained by the protocol,
    or an existing run directory of ours (`run`), used as it is."""

    spec: str | None = None
    overrides: list[str] = []
    run: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Pretraining:
        if (self.spec is None) == (self.run is None):
            raise ValueError("give a run spec (spec) or an existing run directory (run), not both or neither")
        return self

    def spec_file(self) -> Path:
        """The spec file the run starts from: the named spec, or a given run's resolved spec (its latest
        checkpoint's, which says what that model is even if a later launch rewrote the run's spec.yaml)."""
        if self.run is not None:
            run = RunDir(self.run)
            latest = run.latest_tag()
            path = Checkpoint(run.path, latest).spec_file if latest is not None else run.spec_file
            if not path.is_file():
                path = run.spec_file  # a checkpoint from before checkpoints carried their spec
            if not path.is_file():
                raise SpecError([f"run: {self.run} is not a run directory of ours (no spec.yaml)"])
            return path
        return find_spec_file(self.spec)

    def raw_spec(self) -> dict:
        """The run's spec as a raw mapping: the spec file with the overrides applied, or the run's resolved spec."""
        if self.run is not None:
            return yaml.safe_load(self.spec_file().read_text())
        return apply_overrides(read_yaml_mapping(self.spec_file()), list(self.overrides))


class Finetuning(FinetuneSettings):
    """The fine-tuning command's settings (tcd_ds.downstream.spec.FinetuneSettings), for each task and mode."""

    tasks: Annotated[list[str], Field(min_length=1)] = ["movie_reviews"]
    modes: Annotated[list[Mode], Field(min_length=1)] = ["full"]
    train_sizes: Annotated[list[Annotated[int, Field(gt=0)] | None], Field(min_length=1)] = Field(
        [None], description="a column per size: fine-tune on at most this many training examples (the same draw "
        "for every model and seed); null: max_train_examples")

    @model_validator(mode="after")
    def _grid_needs_heldout(self) -> Finetuning:
        self.check_grid(self.modes)
        return self


class Jobs(Section):
    """Fine-tunings and probes run side by side, one per slot (tcd_ds.protocol.slots); slots change no result."""

    slots: Annotated[int, Field(gt=0)] | None = Field(None, description="default: one per GPU; on CPU 1")
    threads: Annotated[int, Field(gt=0)] | None = Field(
        None, description="CPU cores (threads) per job; default: the node's cores / slots")
    pin: bool = Field(True, description="pin each job to its slot's cores (taskset)")


class Preset(Section):
    out_dir: str = "runs/protocol"
    deepspeed: list[str] = Field(["--num_gpus", "2"], description="arguments of the `deepspeed` runner")
    teacher: Pretraining
    moe: Pretraining
    tcd: Pretraining
    ablate: list[RelationLocation] = Field([], description="relation locations to drop one at a time (extra TCD runs)")
    teacher_strengths: list[Annotated[int, Field(gt=0)]] = Field(
        [], description="teacher steps (checkpoints of the one teacher run) to distil one more TCD student from each")
    scratch: bool = Field(True, description="a row with the teacher's shape and random weights, fine-tuned the same way")
    finetune: Finetuning = Field(default_factory=Finetuning)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    jobs: Jobs = Field(default_factory=Jobs)


COMPARED = ("model", "data", "optim", "train", "seed")


def check_preset(preset: Preset) -> dict[str, RunSpec]:
    """Each pre-training stage's spec with its overrides, validated; the comparison's fairness; then everything
    the stages will read, as their launches and jobs would check it. A SpecError names the stage or section and
    the field."""
    specs = stage_specs(preset)
    check_comparison(preset, specs)
    check_inputs(preset, specs)
    return specs


def stage_specs(preset: Preset) -> dict[str, RunSpec]:
    specs = {}
    for name in ("teacher", "moe", "tcd"):
        try:
            specs[name] = validate(RunSpec, getattr(preset, name).raw_spec())
        except SpecError as e:
            raise SpecError([f"{name}: {line}" for line in e.problems]) from None
    return specs


def check_comparison(preset: Preset, specs: dict[str, RunSpec]) -> None:
    """The baseline is the TCD student without its teacher (same model, data, optimiser and step budget), a given
    TCD run was distilled from the given teacher, and what is ablated or taken from the teacher exists."""
    moe, tcd = specs["moe"], specs["tcd"]
    if tcd.distill is None:
        raise SpecError(["tcd: the spec has no distill section"])
    if moe.distill is not None:
        raise SpecError(["moe: the baseline has a distill section"])
    differ = [s for s, (a, b) in zip(COMPARED, zip(comparable(moe), comparable(tcd))) if a != b]
    if differ:
        raise SpecError([f"moe and tcd must differ only by distillation; they differ in: {', '.join(differ)}"])
    if preset.tcd.run is not None:
        teacher = Path(tcd.distill.teacher).resolve()
        if preset.teacher.run is None or teacher != Path(preset.teacher.run).resolve():
            raise SpecError([f"tcd: the given run was distilled from {teacher}, which is not the teacher's run"])
    disabled = [loc for loc in preset.ablate if loc not in enabled_locations(tcd)]
    if disabled:
        raise SpecError([f"ablate: {disabled} not enabled in the TCD student, nothing to drop"])
    alone = [loc for loc in preset.ablate if not any(other != loc for other in enabled_locations(tcd))]
    if alone:
        raise SpecError([f"ablate: without {alone[0]}, its only enabled location, the TCD student has nothing to "
                         "distil"])
    check_teacher_strengths(preset, specs["teacher"])


def check_inputs(preset: Preset, specs: dict[str, RunSpec]) -> None:
    """What the stages read: each pre-training's world size and files (a TCD student's teacher only if it exists
    already: else the protocol trains it), the tasks (not a GLUE task's: its fine-tuning downloads it), the probe
    text."""
    for name, spec in specs.items():
        if getattr(preset, name).run is not None:
            continue
        try:
            world_size = runner_world_size(preset.deepspeed)
            if world_size is not None:
                check_spec(spec, world_size)
            teacher_trained_here = spec.distill is not None and preset.teacher.run is None
            check_files(spec.model_copy(update={"distill": None}) if teacher_trained_here else spec)
        except SpecError as e:
            raise SpecError([f"{name}: {line}" for line in e.problems]) from None
    for task in preset.finetune.tasks:
        if task not in GLUE:
            try:
                load_task(task)
            except TaskError as e:
                raise SpecError([f"finetune.tasks: {e}"]) from None
    check_text_files(preset.probe.files, "probe.files")


def check_teacher_strengths(preset: Preset, teacher: RunSpec) -> None:
    """Each strength must be a checkpoint of the teacher (kept to the end of its run) with its validation loss
    logged: a multiple of its checkpoint and evaluation cadence, within its steps."""
    every = teacher.checkpoint.every * teacher.train.eval_every // math.gcd(teacher.checkpoint.every,
                                                                              teacher.train.eval_every)
    bad = [step for step in preset.teacher_strengths if step % every or step > teacher.train.steps]
    if bad:
        raise SpecError([f"teacher_strengths: {bad} are not teacher steps with a checkpoint and a validation loss "
                         f"(multiples of {every} up to {teacher.train.steps}: checkpoint.every and train.eval_every)"])
    if preset.teacher.run is not None:
        missing = [step for step in preset.teacher_strengths if step not in RunDir(preset.teacher.run).steps()]
        if missing:
            raise SpecError([f"teacher_strengths: the teacher run {preset.teacher.run} has no checkpoint of steps "
                             f"{missing}"])


def teacher_keep_last(preset: Preset) -> int | None:
    """How many checkpoints a teacher trained here keeps so that every strength's checkpoint survives; None: no
    strengths, or a given teacher run."""
    if not preset.teacher_strengths or preset.teacher.run is not None:
        return None
    teacher = validate(RunSpec, preset.teacher.raw_spec())
    every, steps = teacher.checkpoint.every, teacher.train.steps
    return max(teacher.checkpoint.keep_last, (steps - min(preset.teacher_strengths)) // every + 2)  # + the last


def runner_world_size(runner_args: list[str]) -> int | None:
    """The ranks `deepspeed RUNNER_ARGS` starts on one node (`--num_gpus N`); None when it depends on a hostfile."""
    if any(a.startswith(("--hostfile", "--num_nodes", "--include", "--exclude")) for a in runner_args):
        return None
    for i, arg in enumerate(runner_args):
        if arg.startswith("--num_gpus="):
            return int(arg.split("=", 1)[1])
        if arg == "--num_gpus" and i + 1 < len(runner_args):
            return int(runner_args[i + 1])
    return None


def comparable(spec: RunSpec) -> tuple:
    """What must match between the two students (the distill section is left out; the data cache's location
    does not count)."""
    dumped = spec.model_dump()
    dumped["data"].pop("cache_dir")
    return tuple(dumped[s] for s in COMPARED)


def enabled_locations(spec: RunSpec) -> list[str]:
    """The relation locations a TCD spec turns on with a positive weight."""
    return [loc for loc in RELATION_LOCATIONS
            if getattr(spec.distill, loc).enabled and getattr(spec.distill, loc).weight > 0]


def load_preset(path: str | os.PathLike, overrides: list[str] = (), ablate: list[str] | None = None) -> Preset:
    """Read (a path, or a shipped preset's name), override and validate a preset, and check what it names.
    `ablate` (the command line's) replaces the preset's list; empty, it means every location the TCD student has
    enabled."""
    data = apply_overrides(read_yaml_mapping(find_spec_file(path, "preset"), "preset file"), list(overrides))
    preset = validate(Preset, data)
    if ablate is not None:
        preset.ablate = list(ablate) or enabled_locations(check_preset(preset)["tcd"])
    check_preset(preset)
    return preset
