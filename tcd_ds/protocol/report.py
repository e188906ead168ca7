"""The comparison: one row per model (pre-training MLM loss, out-of-domain MLM, downstream mean and spread over
seeds), as JSON and as a markdown table that names the epoch-selection rule and marks constant predictors."""

from __future__ import annotations

import json
from pathlib import Path

from tcd_ds.protocol.plan import Model, finetune_result, probe_result, task_name
from tcd_ds.protocol.preset import Preset
from tcd_ds.rundir import RunDir
from tcd_ds.train.metrics import read_metrics


def pretraining_summary(records: list[dict]) -> dict:
    """The last logged step's training MLM loss and the last evaluation's validation loss and accuracy."""
    last_eval = [r for r in records if "val/loss/mlm" in r][-1]
    return {"steps": records[-1]["step"], "loss/mlm": records[-1]["loss/mlm"],
            "val/loss/mlm": last_eval["val/loss/mlm"], "val/accuracy": last_eval["val/accuracy"]}


def downstream_summary(result: dict) -> dict:
    split, metric = result["report_split"], result["main_metric"]
    return {"task": result["task"], "mode": result["mode"], "split": split, "metric": metric,
            **result["summary"][split][metric], "scores": [run["scores"][split][metric] for run in result["runs"]],
            "seeds": result["seeds"], "selection_rule": result["selection_rule"],
            "constant_prediction_seeds": result["constant_prediction_seeds"]}


def gather(preset: Preset, rows: list[Model], out: Path) -> dict:
    models = []
    for m in rows:
        downstream = {}
        for task in preset.finetune.tasks:
            for mode in preset.finetune.modes:
                result = json.loads(finetune_result(out, m.name, task, mode).read_text())
                downstream[f"{task_name(task)} {mode}"] = downstream_summary(result)
        models.append({
            "name": m.name, "run_dir": None if m.run_dir is None else str(m.run_dir),
            "hf_dir": str(out / "hf" / m.name),
            "pretrain": None if m.run_dir is None else pretraining_summary(read_metrics(RunDir(m.run_dir).metrics_file)),
            "ood_mlm": json.loads(probe_result(out, m.name).read_text()),
            "downstream": downstream,
        })
    return {"probe": preset.probe.name, "seeds": preset.finetune.seeds, "models": models}


def score_cell(d: dict) -> str:
    cell = f"{d['mean']:.3f} ± {d['std']:.3f}"
    if d["constant_prediction_seeds"]:
        cell += f" (constant: seed{'s' if len(d['constant_prediction_seeds']) > 1 else ''} " \
                f"{', '.join(map(str, d['constant_prediction_seeds']))})"
    return cell


def markdown_table(results: dict) -> str:
    columns = list(results["models"][0]["downstream"])
    first = results["models"][0]["downstream"]
    header = ["model", "pre-training steps", "MLM loss (val)", f"OOD MLM loss ({results['probe']})",
              "OOD MLM accuracy", *(f"{c}: {first[c]['split']} {first[c]['metric']}" for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for m in results["models"]:
        pretrain = m["pretrain"]
        cells = [m["name"], "0" if pretrain is None else str(pretrain["steps"]),
                 "—" if pretrain is None else f"{pretrain['val/loss/mlm']:.3f}",
                 f"{m['ood_mlm']['loss']:.3f}", f"{m['ood_mlm']['accuracy']:.3f}",
                 *(score_cell(m["downstream"][c]) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, results["seeds"]))
    rules = sorted({d["selection_rule"] for m in results["models"] for d in m["downstream"].values()})
    lines.append("")
    lines.append(f"Downstream: mean ± sample standard deviation over seeds {seeds} of the task's first metric, on "
                 f"its test split (dev where it has none), with the weights of {' / '.join(rules)}.")
    if any(m["pretrain"] is None for m in results["models"]):
        lines.append("scratch: the teacher's shape with random weights (no pre-training), fine-tuned the same way.")
    if any(d["constant_prediction_seeds"] for m in results["models"] for d in m["downstream"].values()):
        lines.append("constant: those seeds predict one class (or value) for every example: they learnt nothing.")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    return table
