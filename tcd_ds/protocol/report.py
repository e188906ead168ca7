"""The comparison: one row per model (pre-training MLM loss, out-of-domain MLM, downstream mean and spread over
seeds), as JSON and as a markdown table."""

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
            "seeds": result["seeds"]}


def gather(preset: Preset, rows: list[Model], out: Path) -> dict:
    models = []
    for m in rows:
        downstream = {}
        for task in preset.finetune.tasks:
            for mode in preset.finetune.modes:
                result = json.loads(finetune_result(out, m.name, task, mode).read_text())
                downstream[f"{task_name(task)} {mode}"] = downstream_summary(result)
        models.append({
            "name": m.name, "run_dir": str(m.run_dir), "hf_dir": str(out / "hf" / m.name),
            "pretrain": pretraining_summary(read_metrics(RunDir(m.run_dir).metrics_file)),
            "ood_mlm": json.loads(probe_result(out, m.name).read_text()),
            "downstream": downstream,
        })
    return {"probe": preset.probe.name, "seeds": preset.finetune.seeds, "models": models}


def markdown_table(results: dict) -> str:
    columns = list(results["models"][0]["downstream"])
    first = results["models"][0]["downstream"]
    header = ["model", "pre-training steps", "MLM loss (val)", f"OOD MLM loss ({results['probe']})",
              "OOD MLM accuracy", *(f"{c}: {first[c]['split']} {first[c]['metric']}" for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for m in results["models"]:
        cells = [m["name"], str(m["pretrain"]["steps"]), f"{m['pretrain']['val/loss/mlm']:.3f}",
                 f"{m['ood_mlm']['loss']:.3f}", f"{m['ood_mlm']['accuracy']:.3f}",
                 *(f"{m['downstream'][c]['mean']:.3f} ± {m['downstream'][c]['std']:.3f}" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, results["seeds"]))
    lines.append("")
    lines.append(f"Downstream: mean ± sample standard deviation over seeds {seeds} of the task's first metric, on "
                 "its test split (dev where it has none), with the weights of the epoch with the best dev score.")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    return table
