"""The protocol as stages: pre-train teacher, MoE baseline, MoE+TCD (one TCD run per ablated relation location,
and one per teacher strength: distilled from an earlier checkpoint of the same teacher) -> convert each to Hugging
Face (and write the from-scratch row: the teacher's shape, random weights) -> MLM probe on out-of-domain text ->
fine-tune on each column (task, training-set size, mode) at each learning rate of the grid and each seed. Probes
and fine-tunings are jobs (`tcd-ds probe`, `tcd-ds finetune`, started by module), run side by side in the preset's
device slots.

Layout of the output directory:
    pretrain/<model>/        run directories (a given `run` is used where it is)
    hf/<model>/              converted models (hf/scratch: the from-scratch model)
    probe/<model>.json       out-of-domain MLM loss and accuracy
    finetune/<model>/<column>/lr_<lr>_seed_<seed>.json
    stages/, logs/           a marker and a log per stage
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tcd_ds.downstream.spec import FinetuneSpec, ProbeSpec
from tcd_ds.protocol.preset import Finetuning, Preset, Pretraining, teacher_keep_last
from tcd_ds.protocol.stages import Stage, command, in_process
from tcd_ds.rundir import RunDir
from tcd_ds.rundir.layout import tag_for
from tcd_ds.spec import as_overrides
from tcd_ds.train.launch import deepspeed_command

SCRATCH = "scratch"


@dataclass
class Model:
    """One row of the comparison: where its run and converted model live, and the key of its pre-training."""

    name: str
    run_dir: Path | None  # None for the from-scratch row (no pre-training)
    pretrain_key: dict
    pretrain: Stage | None  # None for a given run


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def task_name(task: str) -> str:
    return Path(task).name


def pretrain_stage(name: str, spec: str, overrides: list[str], run_dir: Path, preset: Preset, inputs: dict) -> Stage:
    """`deepspeed ... --module tcd_ds.cli.pretrain --spec SPEC --overrides...`, exactly as a user runs it. Like
    torchrun, one OpenMP thread per rank unless OMP_NUM_THREADS says otherwise (ranks share the node's cores)."""
    overrides = [*overrides, f"--run_dir={run_dir}", "--logging.progress_bar=False"]
    key = {"spec_sha256": file_digest(spec), "overrides": overrides, "deepspeed": preset.deepspeed,
           **inputs}
    env = {"OMP_NUM_THREADS": "1", **os.environ}

    def run(log: Path) -> None:
        command(deepspeed_command(preset.deepspeed, spec, overrides), env)(log)

    return Stage(f"pretrain {name}", key, run, [run_dir])


def pretrained_model(name: str, source: Pretraining, preset: Preset, out: Path, extra: list[str] = (),
                     inputs: dict | None = None) -> Model:
    if source.run is not None and not extra:
        run = RunDir(source.run)
        key = {"run": str(run.path.resolve()), "checkpoint": run.latest_tag()}
        return Model(name, run.path, key, None)
    spec = str(source.spec_file())
    overrides = [*(source.overrides if source.run is None else []), *extra]
    run_dir = out / "pretrain" / name
    stage = pretrain_stage(name, spec, overrides, run_dir, preset, inputs or {})
    return Model(name, run_dir, stage.key, stage)


def models(preset: Preset, out: Path) -> list[Model]:
    """Teacher, MoE baseline, MoE+TCD, then one TCD student per ablated location, with that location off, and one
    per teacher strength, distilled from the teacher's checkpoint at that step (the teacher keeps them)."""
    keep = teacher_keep_last(preset)
    teacher = pretrained_model("teacher", preset.teacher, preset, out,
                               [] if keep is None else [f"--checkpoint.keep_last={keep}"])
    moe = pretrained_model("moe", preset.moe, preset, out)
    distill_from = [] if preset.tcd.run is not None else [f"--distill.teacher={teacher.run_dir}"]
    tcd = pretrained_model("tcd", preset.tcd, preset, out, distill_from, {"teacher": teacher.pretrain_key})
    ablated = [
        pretrained_model(f"tcd-no_{loc}", preset.tcd, preset, out,
                         [*distill_from, f"--distill.{loc}.enabled=False"], {"teacher": teacher.pretrain_key})
        for loc in preset.ablate
    ]
    strengths = [
        pretrained_model(strength_model(step), preset.tcd, preset, out,
                         [f"--distill.teacher={teacher.run_dir}", f"--distill.teacher_tag={tag_for(step)}"],
                         {"teacher": teacher.pretrain_key, "teacher_step": step})
        for step in preset.teacher_strengths
    ]
    return [teacher, moe, tcd, *ablated, *strengths]


def strength_model(step: int) -> str:
    """The row of the TCD student distilled from the teacher at `step`."""
    return f"tcd@{step}"


def convert_stage(model: Model, hf_dir: Path, key: dict) -> Stage:
    """tools/convert_to_hf.py's conversion, in this process."""

    def run() -> None:
        from tcd_ds.hf.convert import convert

        convert(model.run_dir, hf_dir, force=True)

    return Stage(f"convert {model.name}", key, in_process(run), [hf_dir])


def scratch_stage(teacher_hf: Path, hf_dir: Path, key: dict) -> Stage:
    """The from-scratch model: the converted teacher's config and tokenizer, random weights (seed 0)."""

    def run() -> None:
        from tcd_ds.hf.scratch import write_scratch_model

        write_scratch_model(teacher_hf, hf_dir, seed=key["seed"])

    return Stage("init scratch", key, in_process(run), [hf_dir])


def job_command(module: str, spec: FinetuneSpec | ProbeSpec) -> list[str]:
    """`python -m MODULE --key=value ...`: a job's command with every setting of its spec spelled out."""
    return [sys.executable, "-m", module, *as_overrides(spec)]


def probe_stage(model: str, hf_dir: Path, preset: Preset, out: Path, key: dict) -> Stage:
    """`tcd-ds probe`: the out-of-domain MLM probe (a forward pass over a few hundred blocks), a job."""
    result_file = probe_result(out, model)
    spec = ProbeSpec(**preset.probe.model_dump(), model=str(hf_dir), out=str(result_file))
    return Stage(f"probe {model}", key, command(job_command("tcd_ds.cli.probe", spec)), [result_file], job=True)


@dataclass(frozen=True)
class Column:
    """One column of the comparison: a task, fine-tuned on at most `size` training examples (None: the
    settings' max_train_examples), in one mode."""

    task: str
    size: int | None
    mode: str

    @property
    def name(self) -> str:
        return f"{task_name(self.task)}{'' if self.size is None else f' {self.size} ex.'} {self.mode}"

    @property
    def slug(self) -> str:
        return self.name.replace(" ex.", "").replace(" ", "_")


def columns(ft: Finetuning) -> list[Column]:
    return [Column(task, size, mode) for task in ft.tasks for size in ft.train_sizes for mode in ft.modes]


def finetune_jobs(out: Path, model: str, column: Column, ft: Finetuning) -> list[tuple[float, int, Path]]:
    """(lr, seed, result file) of every fine-tuning job of a model in a column: one per lr of the grid and seed."""
    return [(lr, seed, out / "finetune" / model / column.slug / f"lr_{lr:g}_seed_{seed}.json")
            for lr in ft.lr_for(column.mode) for seed in ft.seeds]


def finetune_stages(model: str, hf_dir: Path, column: Column, ft: Finetuning, out: Path, key: dict) -> list[Stage]:
    """`tcd-ds finetune` with the preset's settings for this column, one job per learning rate and seed."""
    settings = ft.model_dump(exclude={"tasks", "modes", "train_sizes"})
    if column.size is not None:
        settings["max_train_examples"] = column.size
    stages = []
    for lr, seed, result_file in finetune_jobs(out, model, column, ft):
        grid = "lr" if column.mode == "full" else "adapter_lr"
        spec = FinetuneSpec(**{**settings, grid: [lr], "seeds": [seed]}, model=str(hf_dir), task=column.task,
                            mode=column.mode, out=str(result_file))
        stages.append(Stage(f"finetune {model} {column.slug} lr {lr:g} seed {seed}",
                            {**key, "column": column.name, "lr": lr, "seed": seed},
                            command(job_command("tcd_ds.cli.finetune", spec)), [result_file], job=True))
    return stages


def stages(preset: Preset, out: Path) -> tuple[list[Model], list[Stage]]:
    """The models compared and every stage, in order."""
    rows = models(preset, out)
    result = [m.pretrain for m in rows if m.pretrain is not None]
    convert_keys = {m.name: {"model": m.pretrain_key} for m in rows}
    result += [convert_stage(m, out / "hf" / m.name, convert_keys[m.name]) for m in rows]
    if preset.scratch:
        key = {"shape_of": convert_keys["teacher"], "seed": 0}
        rows.append(Model(SCRATCH, None, key, None))
        convert_keys[SCRATCH] = key
        result.append(scratch_stage(out / "hf" / "teacher", out / "hf" / SCRATCH, key))
    for m in rows:
        key = {"model": convert_keys[m.name], "probe": preset.probe.model_dump()}
        result.append(probe_stage(m.name, out / "hf" / m.name, preset, out, key))
    ft = preset.finetune
    settings = ft.model_dump(exclude={"tasks", "modes", "train_sizes", "lr", "adapter_lr", "seeds"})
    for m in rows:
        for column in columns(ft):
            key = {"model": convert_keys[m.name], "settings": settings}
            result += finetune_stages(m.name, out / "hf" / m.name, column, ft, out, key)
    return rows, result


def probe_result(out: Path, model: str) -> Path:
    return out / "probe" / f"{model}.json"

