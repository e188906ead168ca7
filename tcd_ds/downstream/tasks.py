"""Downstream tasks: which text fields, which label, which metrics, and the examples of each split.

A task is a GLUE task by name (loaded through `datasets`, needs the network once) or a local directory holding
`task.yaml` and its split files (TSV, CSV or JSONL), e.g. the bundled `data/tasks/movie_reviews`:

    name: movie_reviews
    train: train.tsv
    dev: dev.tsv
    test: test.tsv                 # optional
    text_fields: [sentence]        # one field, or two for a sentence pair
    label_field: label
    kind: classification           # or regression (num_labels 1)
    num_labels: 2
    labels: null                   # optional label names in id order; else labels are ids 0..num_labels-1
    metrics: [accuracy, f1]        # the first one selects the epoch and is the one reported
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tcd_ds.downstream.metrics import METRICS
from tcd_ds.resources import bundled_tasks


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: float  # a class id (integral) or a regression target


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    train: str
    dev: str
    test: str | None = None
    text_fields: Annotated[list[str], Field(min_length=1, max_length=2)]
    label_field: str = "label"
    kind: Literal["classification", "regression"] = "classification"
    num_labels: Annotated[int, Field(ge=1)] = 2
    labels: list[str] | None = None
    metrics: Annotated[list[str], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
        if self.kind == "regression" and self.num_labels != 1:
            raise ValueError("a regression task has num_labels 1")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ValueError(f"labels lists {len(self.labels)} names for num_labels {self.num_labels}")
        return self


@dataclass
class Task:
    spec: TaskSpec
    splits: dict[str, list[Example]]  # "train", "dev" and any further evaluation splits ("test", ...)

    @property
    def main_metric(self) -> str:
        return self.spec.metrics[0]

    def eval_splits(self) -> list[str]:
        return [name for name in self.splits if name != "train"]


# GLUE by name: text fields, kind, number of labels, official metrics, evaluation splits (the test splits have no
# labels, so GLUE results are dev results; MNLI's mismatched dev set is reported beside the matched one).
GLUE: dict[str, dict] = {
    "cola": dict(text_fields=["sentence"], num_labels=2, metrics=["matthews"]),
    "sst2": dict(text_fields=["sentence"], num_labels=2, metrics=["accuracy"]),
    "mrpc": dict(text_fields=["sentence1", "sentence2"], num_labels=2, metrics=["f1", "accuracy"]),
    "qqp": dict(text_fields=["question1", "question2"], num_labels=2, metrics=["f1", "accuracy"]),
    "stsb": dict(text_fields=["sentence1", "sentence2"], kind="regression", num_labels=1,
                 metrics=["pearson", "spearman"]),
    "mnli": dict(text_fields=["premise", "hypothesis"], num_labels=3, metrics=["accuracy"]),
    "qnli": dict(text_fields=["question", "sentence"], num_labels=2, metrics=["accuracy"]),
    "rte": dict(text_fields=["sentence1", "sentence2"], num_labels=2, metrics=["accuracy"]),
    "wnli": dict(text_fields=["sentence1", "sentence2"], num_labels=2, metrics=["accuracy"]),
}
GLUE_SPLITS = {"mnli": {"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched"}}
GLUE_HUB_NAME = "nyu-mll/glue"


class TaskError(ValueError):
    """A task that cannot be loaded; the message names the file, field or value."""


def read_rows(path: Path) -> list[dict]:
    """The records of a TSV (unquoted, as GLUE's), CSV or JSONL file, each a mapping of column to value."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".tsv", ".csv"):
        raise TaskError(f"{path}: unknown file type {path.suffix!r}; use .tsv, .csv or .jsonl")
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".tsv":
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(csv.DictReader(f))


def to_example(row: dict, spec: TaskSpec, where: str) -> Example:
    missing = [k for k in (*spec.text_fields, spec.label_field) if row.get(k) is None]
    if missing:
        raise TaskError(f"{where}: no field(s) {missing}")
    raw = row[spec.label_field]
    try:
        if spec.kind == "regression":
            label = float(raw)
        elif spec.labels is not None:
            label = spec.labels.index(str(raw))
        else:
            label = int(raw)
    except ValueError:
        raise TaskError(f"{where}: label {raw!r} is not one of {spec.labels or 'the class ids'}") from None
    if spec.kind == "classification" and not 0 <= label < spec.num_labels:
        raise TaskError(f"{where}: label {raw!r} outside 0..{spec.num_labels - 1}")
    return Example(tuple(str(row[k]) for k in spec.text_fields), label)


def load_local_task(directory: Path) -> Task:
    try:
        spec = TaskSpec.model_validate(yaml.safe_load((directory / "task.yaml").read_text()))
    except FileNotFoundError:
        raise TaskError(f"{directory}: no task.yaml") from None
    except ValidationError as e:
        raise TaskError(f"{directory / 'task.yaml'}: {e}") from None
    splits = {}
    for split in ("train", "dev", "test"):
        file = getattr(spec, split)
        if file is None:
            continue
        path = directory / file
        if not path.is_file():
            raise TaskError(f"{directory / 'task.yaml'}: {split} file {path} not found")
        splits[split] = [to_example(row, spec, f"{path} row {i + 1}") for i, row in enumerate(read_rows(path))]
    return Task(spec, splits)


def load_glue_task(name: str) -> Task:
    import datasets

    return glue_task(name, datasets.load_dataset(GLUE_HUB_NAME, name))


def glue_task(name: str, data) -> Task:
    """A GLUE task from its `datasets.DatasetDict` (as the hub's `nyu-mll/glue` has it)."""
    spec = TaskSpec(name=name, train="train", dev="validation", **GLUE[name])
    splits = GLUE_SPLITS.get(name, {"train": "train", "dev": "validation"})
    return Task(spec, {
        ours: [to_example(row, spec, f"{GLUE_HUB_NAME}/{name} {hub}") for row in data[hub]]
        for ours, hub in splits.items()
    })


def load_task(name_or_dir: str) -> Task:
    """A local task directory (with task.yaml), else a bundled task by name, else a GLUE task by name."""
    if Path(name_or_dir).is_dir():
        return load_local_task(Path(name_or_dir))
    bundled = bundled_tasks()
    if name_or_dir in bundled:
        return load_local_task(bundled[name_or_dir])
    if name_or_dir in GLUE:
        return load_glue_task(name_or_dir)
    raise TaskError(f"{name_or_dir}: neither a task directory, a bundled task ({', '.join(bundled)}) nor a GLUE "
                    f"task ({', '.join(GLUE)})")
