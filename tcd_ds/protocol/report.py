"""The comparison: one row per model (pre-training MLM loss, out-of-domain MLM, downstream mean and spread over
seeds at the learning rate the held-out slice selected), each model's paired difference to the MoE baseline and
to the teacher, and the teacher-strength curve; as JSON and as markdown tables that name the selection rules and
mark constant predictors and intervals that exclude zero."""

from __future__ import annotations

import json
from pathlib import Path

from tcd_ds.downstream.finetune import merge_results
from tcd_ds.downstream.stats import paired_difference
from tcd_ds.protocol.plan import SCRATCH, Model, columns, finetune_jobs, probe_result, strength_model
from tcd_ds.protocol.preset import Preset
from tcd_ds.rundir import RunDir
from tcd_ds.train.metrics import read_metrics

# Each model's paired difference is taken to these rows (those present): does distillation beat the plain MoE
# student, does the student beat its teacher, does pre-training beat none.
REFERENCES = ("moe", "teacher", SCRATCH)


def pretraining_summary(records: list[dict]) -> dict:
    """The last logged step's training MLM loss and the last evaluation's validation loss and accuracy."""
    last_eval = [r for r in records if "val/loss/mlm" in r][-1]
    return {"steps": records[-1]["step"], "loss/mlm": records[-1]["loss/mlm"],
            "val/loss/mlm": last_eval["val/loss/mlm"], "val/accuracy": last_eval["val/accuracy"]}


def downstream_summary(result: dict) -> dict:
    split, metric = result["report_split"], result["main_metric"]
    return {"task": result["task"], "mode": result["mode"], "split": split, "metric": metric,
            **result["summary"][split][metric], "scores": [run["scores"][split][metric] for run in result["runs"]],
            "seeds": result["seeds"], "selected_lr": result["selected_lr"], "lr_grid": result["lr_grid"],
            "selection_rule": result["selection_rule"],
            "constant_prediction_seeds": result["constant_prediction_seeds"]}


def gather(preset: Preset, rows: list[Model], out: Path) -> dict:
    finetuned = {m.name: {c.name: merge_results([json.loads(path.read_text()) for _, _, path in
                                                 finetune_jobs(out, m.name, c, preset.finetune)])
                          for c in columns(preset.finetune)} for m in rows}
    models = []
    for m in rows:
        models.append({
            "name": m.name, "run_dir": None if m.run_dir is None else str(m.run_dir),
            "hf_dir": str(out / "hf" / m.name),
            "pretrain": None if m.run_dir is None else pretraining_summary(read_metrics(RunDir(m.run_dir).metrics_file)),
            "ood_mlm": json.loads(probe_result(out, m.name).read_text()),
            "downstream": {column: downstream_summary(result) for column, result in finetuned[m.name].items()},
            "differences": {column: {ref: paired_difference(result, finetuned[ref][column], result["main_metric"])
                                     for ref in REFERENCES if ref != m.name and ref in finetuned}
                            for column, result in finetuned[m.name].items()},
        })
    results = {"probe": preset.probe.name, "seeds": preset.finetune.seeds, "models": models}
    if preset.teacher_strengths:
        results["teacher_strength"] = teacher_strength(preset, rows, models)
    return results


def teacher_strength(preset: Preset, rows: list[Model], models: list[dict]) -> list[dict]:
    """One point per TCD student distilled from the teacher at some step (the full-budget `tcd` at the teacher's
    last): the teacher's validation MLM loss then, and the student's out-of-domain MLM and downstream scores."""
    by_name = {m["name"]: m for m in models}
    teacher_run = next(m.run_dir for m in rows if m.name == "teacher")
    val = {r["step"]: r["val/loss/mlm"] for r in read_metrics(RunDir(teacher_run).metrics_file) if "val/loss/mlm" in r}
    points = [(step, strength_model(step)) for step in preset.teacher_strengths]
    points.append((by_name["teacher"]["pretrain"]["steps"], "tcd"))
    return [{"teacher_step": step, "teacher_val_mlm": val[step], "model": name,
             "ood_mlm": by_name[name]["ood_mlm"], "downstream": by_name[name]["downstream"],
             "differences": by_name[name]["differences"]} for step, name in sorted(points)]


def score_cell(d: dict) -> str:
    cell = f"{d['mean']:.3f} ± {d['std']:.3f}"
    if len(d["lr_grid"]) > 1:
        cell += f" (lr {d['selected_lr']:g})"
    if d["constant_prediction_seeds"]:
        cell += f" (constant: seed{'s' if len(d['constant_prediction_seeds']) > 1 else ''} " \
                f"{', '.join(map(str, d['constant_prediction_seeds']))})"
    return cell


def difference_cell(d: dict) -> str:
    """`+0.012 [-0.004, +0.028] [+0.003, +0.021]*`: mean, t interval over seeds, bootstrap interval over examples;
    `*` after an interval that excludes zero."""
    t, boot = d["t"], d["bootstrap"]
    return (f"{d['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]{'*' if t['excludes_zero'] else ''} "
            f"[{boot['low']:+.3f}, {boot['high']:+.3f}]{'*' if boot['excludes_zero'] else ''}")


def markdown_table(results: dict) -> str:
    columns_ = list(results["models"][0]["downstream"])
    first = results["models"][0]["downstream"]
    header = ["model", "pre-training steps", "MLM loss (val)", f"OOD MLM loss ({results['probe']})",
              "OOD MLM accuracy", *(f"{c}: {first[c]['split']} {first[c]['metric']}" for c in columns_)]
    lines = table_lines(header)
    for m in results["models"]:
        pretrain = m["pretrain"]
        cells = [m["name"], "0" if pretrain is None else str(pretrain["steps"]),
                 "—" if pretrain is None else f"{pretrain['val/loss/mlm']:.3f}",
                 f"{m['ood_mlm']['loss']:.3f}", f"{m['ood_mlm']['accuracy']:.3f}",
                 *(score_cell(m["downstream"][c]) for c in columns_)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, results["seeds"]))
    rules = sorted({d["selection_rule"] for m in results["models"] for d in m["downstream"].values()})
    lines.append("")
    lines.append(f"Downstream: mean ± sample standard deviation over seeds {seeds} of the task's first metric, on "
                 f"its test split (dev where it has none), with the weights of {' / '.join(rules)}; where a grid "
                 "of learning rates was tried, at the one with the best mean score on that held-out slice (named).")
    if any(m["pretrain"] is None for m in results["models"]):
        lines.append(f"{SCRATCH}: the teacher's shape with random weights (no pre-training), fine-tuned the same way.")
    if any(d["constant_prediction_seeds"] for m in results["models"] for d in m["downstream"].values()):
        lines.append("constant: those seeds predict one class (or value) for every example: they learnt nothing.")
    lines += ["", *differences_table(results, columns_)]
    if "teacher_strength" in results:
        lines += ["", *strength_table(results["teacher_strength"], columns_)]
    return "\n".join(lines) + "\n"


def differences_table(results: dict, columns_: list[str]) -> list[str]:
    references = [ref for ref in REFERENCES if ref in {m["name"] for m in results["models"]}]
    header = ["model", *(f"{c}: - {ref}" for c in columns_ for ref in references)]
    lines = ["Paired differences, model - reference, on the same seeds: mean over seeds [95% t interval over seeds] "
             "[95% bootstrap interval over evaluation examples]; * where the interval excludes zero.", "",
             *table_lines(header)]
    for m in results["models"]:
        cells = [difference_cell(m["differences"][c][ref]) if ref in m["differences"][c] else "—"
                 for c in columns_ for ref in references]
        lines.append("| " + " | ".join([m["name"], *cells]) + " |")
    return lines


def strength_table(points: list[dict], columns_: list[str]) -> list[str]:
    header = ["teacher step", "teacher MLM loss (val)", "student", "OOD MLM loss", *columns_,
              *(f"{c}: - moe" for c in columns_)]
    lines = ["Teacher strength: TCD students distilled from the teacher's checkpoints (plots/teacher_strength.png).",
             "", *table_lines(header)]
    for p in points:
        cells = [str(p["teacher_step"]), f"{p['teacher_val_mlm']:.3f}", p["model"], f"{p['ood_mlm']['loss']:.3f}",
                 *(score_cell(p["downstream"][c]) for c in columns_),
                 *(difference_cell(p["differences"][c]["moe"]) for c in columns_)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_lines(header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]


def write_report(results: dict, out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if "teacher_strength" in results:
        (out / "teacher_strength.json").write_text(json.dumps(results["teacher_strength"], indent=1))
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    return table
