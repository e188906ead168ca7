"""`tcd-ds reproduce`, the one-command protocol, at the tiny preset: the table (with the from-scratch row) and
the plots, jobs in two slots scoring as in one, finished stages skipped on rerun, changed settings rerun
downstream, the ablation switch and the preset's checks.

The protocol runs as users run it on a cluster: `tcd-ds reproduce` of the installed wheel (conftest's
`installed_wheel`), from an empty directory. The session's tiny teacher, MoE and TCD runs (conftest.py) are given to
it as existing runs; it pre-trains the teacher-strength student itself, through the `deepspeed` runner."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_ok
from tcd_ds.protocol.plan import stages
from tcd_ds.protocol.preset import Preset, check_comparison, load_preset, stage_specs
from tcd_ds.protocol.report import markdown_table
from tcd_ds.protocol.slots import make_slots
from tcd_ds.protocol.stages import Stage, StageFailed, command, run_stages
from tcd_ds.resources import PRESETS
from tcd_ds.spec import SpecError, validate
from tcd_ds.train.metrics import read_metrics

TINY = PRESETS / "protocol_tiny.yaml"
BUDGET = "--train.steps=8, --logging.every=1, --train.eval_every=4, --checkpoint.every=4"  # conftest's fast()
PNG = b"\x89PNG\r\n\x1a\n"


def given_runs(teacher_run: Path, moe_run: Path, tcd_run: Path, cache_dir: Path) -> list[str]:
    """Every pre-training given as an existing run: `--ROW.spec=null --ROW.run=DIR`."""
    runs = {"teacher": teacher_run, "moe": moe_run, "tcd": tcd_run}
    return [*(arg for row, run in runs.items() for arg in (f"--{row}.spec=null", f"--{row}.run={run}")),
            f"--probe.cache_dir={cache_dir}"]


STRENGTH = 8  # a checkpoint of the given teacher run (12 steps, checkpoints 8 and 12 kept): the row tcd@8
MODELS = ["teacher", "moe", "tcd", f"tcd@{STRENGTH}", "scratch"]


def job_results(out: Path, model: str) -> list[dict]:
    """The fine-tuning jobs' results of a model on the tiny preset's one column (lr 1e-3; seeds 1 and 2)."""
    return [json.loads((out / "finetune" / model / "movie_reviews_full" / f"lr_0.001_seed_{seed}.json").read_text())
            for seed in (1, 2)]


@pytest.fixture(scope="module")
def reproduce(installed_wheel, tmp_path_factory):
    """`tcd-ds reproduce --preset tiny --out OUT ARGS` of the installed wheel, from an empty directory."""
    bin_dir, env = installed_wheel
    cwd = tmp_path_factory.mktemp("empty")

    def run(out: Path, *args: str) -> subprocess.CompletedProcess:
        return run_ok([bin_dir / "tcd-ds", "reproduce", "--preset", "tiny", "--out", out, *args], cwd, env)

    return run


@pytest.fixture(scope="module")
def protocol(reproduce, tmp_path_factory, teacher_run, moe_run, tcd_run, cache_dir) -> tuple[Path, list[str], str]:
    """Two teacher strengths: the listed checkpoint (step 8, the row tcd@8) and the teacher's last (the tcd row)."""
    out = tmp_path_factory.mktemp("protocol")
    args = [*given_runs(teacher_run, moe_run, tcd_run, cache_dir), f"--teacher_strengths=[{STRENGTH}]"]
    return out, args, reproduce(out, *args).stdout


def numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_protocol_writes_one_row_per_model_with_finite_numbers(protocol, teacher_run, moe_run, tcd_run):
    out, _, stdout = protocol
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == MODELS
    assert all(math.isfinite(x) for x in numbers(results))
    runs = {"teacher": teacher_run, "moe": moe_run, "tcd": tcd_run,
            f"tcd@{STRENGTH}": out / "pretrain" / f"tcd@{STRENGTH}"}
    for m in results["models"]:
        if m["name"] == "scratch":
            assert m["pretrain"] is None and m["run_dir"] is None
        else:
            records = read_metrics(runs[m["name"]] / "metrics.jsonl")
            assert m["pretrain"]["steps"] == records[-1]["step"] == (12 if m["name"] == "teacher" else 8)
            assert m["pretrain"]["val/loss/mlm"] == records[-1]["val/loss/mlm"]
        assert 0 < m["ood_mlm"]["loss"] and 0 <= m["ood_mlm"]["accuracy"] <= 1 and m["ood_mlm"]["masked_tokens"] > 0
        jobs = job_results(out, m["name"])
        scores = [job["runs"][0]["scores"]["test"]["accuracy"] for job in jobs]
        row = m["downstream"]["movie_reviews full"]
        assert row["scores"] == scores and row["seeds"] == [1, 2] and row["selected_lr"] == 1e-3
        assert row["mean"] == pytest.approx(sum(scores) / 2)
        assert all(job["selection"] == "heldout" and job["heldout_examples"] == 64 for job in jobs)
        assert set(m["differences"]["movie_reviews full"]) == {"moe", "teacher", "scratch"} - {m["name"]}
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == [f"tcd@{STRENGTH}"]  # the others: given runs

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split("|")[1].strip() for row in rows[1:6]] == MODELS  # rows[0]: rule
    assert rows[5].split("|")[2:4] == [" 0 ", " — "]  # no pre-training steps, no validation loss
    assert "Paired differences, model - reference" in table and "Teacher strength" in table
    assert "the epoch with the best accuracy on a held-out slice of train (64 examples" in table
    assert table in stdout and "[protocol] finished" in stdout
    jobs = [line for line in stdout.splitlines() if ": running on slot" in line]
    assert len(jobs) == 15 and {line.split(" on slot ")[1][0] for line in jobs} == {"0", "1"}  # 5 probes, 10 fine-tunings


def test_differences_are_paired_by_seed_and_the_teacher_strength_curve_is_written(protocol, teacher_run):
    out, _, _ = protocol
    results = json.loads((out / "results.json").read_text())
    by_name = {m["name"]: m for m in results["models"]}
    tcd, moe = (by_name[name]["downstream"]["movie_reviews full"] for name in ("tcd", "moe"))
    difference = by_name["tcd"]["differences"]["movie_reviews full"]["moe"]
    assert difference["differences"] == [a - b for a, b in zip(tcd["scores"], moe["scores"])]
    assert difference["t"]["low"] <= difference["mean"] <= difference["t"]["high"]
    val = {r["step"]: r["val/loss/mlm"] for r in read_metrics(teacher_run / "metrics.jsonl") if "val/loss/mlm" in r}
    curve = json.loads((out / "teacher_strength.json").read_text())
    assert curve == results["teacher_strength"]
    assert [(p["teacher_step"], p["model"], p["teacher_val_mlm"]) for p in curve] == \
        [(STRENGTH, f"tcd@{STRENGTH}", val[STRENGTH]), (12, "tcd", val[12])]
    assert curve[0]["downstream"] == by_name[f"tcd@{STRENGTH}"]["downstream"]
    spec = yaml.safe_load((out / "pretrain" / f"tcd@{STRENGTH}" / "spec.yaml").read_text())
    assert spec["distill"]["teacher_tag"] == f"step_{STRENGTH}" and spec["distill"]["teacher"] == str(teacher_run)


def test_scratch_model_has_the_teachers_shape_and_fresh_weights(protocol):
    from safetensors.torch import load_file

    out, _, _ = protocol
    teacher, scratch = (load_file(out / "hf" / name / "model.safetensors") for name in ("teacher", "scratch"))
    assert {k: v.shape for k, v in scratch.items()} == {k: v.shape for k, v in teacher.items()}
    assert not any(torch.equal(scratch[k], teacher[k]) for k in teacher if k.endswith("dense.weight"))
    assert json.loads((out / "hf" / "scratch" / "config.json").read_text())["hidden_size"] == \
        json.loads((out / "hf" / "teacher" / "config.json").read_text())["hidden_size"]


def test_protocol_writes_the_plots(protocol):
    out, _, _ = protocol
    for name in ("pretraining", "relation_losses", "expert_load", "routing", "downstream", "teacher_strength"):
        data = (out / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


def test_rerun_skips_every_finished_stage(protocol, reproduce):
    out, args, _ = protocol
    before = (out / "results.json").read_text()
    stdout = reproduce(out, *args).stdout
    progress = [line for line in stdout.splitlines() if line.startswith("[protocol ")]
    assert len(progress) == 21  # 1 pre-training (not the given runs'), 4 conversions, the scratch model, 5 probes,
    # 10 fine-tunings (one per seed)
    assert all(line.endswith("done in an earlier run, skipped") for line in progress), progress
    assert (out / "results.json").read_text() == before


def test_one_slot_scores_as_two(protocol, reproduce):
    """A teacher's and a student's fine-tuning, which ran beside other jobs in two slots, run again one after the
    other in a single slot (with the same thread per job): the same numbers, to the last bit."""
    out, args, _ = protocol
    jobs = [("teacher", 1), ("tcd", 2)]
    parallel = {(model, seed): job_results(out, model)[seed - 1] for model, seed in jobs}
    for model, seed in jobs:
        (out / "finetune" / model / "movie_reviews_full" / f"lr_0.001_seed_{seed}.json").unlink()
        (out / "stages" / f"finetune_{model}_movie_reviews_full_lr_0.001_seed_{seed}.json").unlink()
    stdout = reproduce(out, *args, "--jobs.slots=1").stdout
    reran = [line for line in stdout.splitlines() if ": running on slot" in line]
    assert len(reran) == 2 and all(" on slot 0 (cores " in line for line in reran), reran
    for model, seed in jobs:
        assert job_results(out, model)[seed - 1]["all_runs"] == parallel[model, seed]["all_runs"]


def test_table_marks_constant_predictors():
    cell = {"split": "test", "metric": "accuracy", "mean": 0.5, "std": 0.0, "scores": [0.5, 0.5], "seeds": [1, 2],
            "selection_rule": "the last epoch", "constant_prediction_seeds": [2], "lr_grid": {"0.001": {}},
            "selected_lr": 1e-3}
    row = {"name": "teacher", "pretrain": {"steps": 3, "val/loss/mlm": 7.0},
           "ood_mlm": {"loss": 7.0, "accuracy": 0.1}, "downstream": {"movie_reviews full": cell},
           "differences": {"movie_reviews full": {}}}
    table = markdown_table({"probe": "nyt", "seeds": [1, 2], "models": [row]})
    assert "| 0.500 ± 0.000 (constant: seed 2) |" in table
    assert "with the weights of the last epoch;" in table and "they learnt nothing" in table


def test_changed_settings_rerun_the_stage_and_what_follows_it(tmp_path):
    calls = []

    def plan(teacher_steps: int) -> list[Stage]:
        teacher = Stage("pretrain teacher", {"steps": teacher_steps}, lambda log: calls.append("teacher"),
                        [tmp_path / "teacher.out"])
        student = Stage("finetune teacher", {"model": teacher.key}, lambda log: calls.append("finetune"))
        other = Stage("pretrain moe", {"steps": 5}, lambda log: calls.append("moe"))
        return [teacher, student, other]

    (tmp_path / "teacher.out").write_text("old")
    run_stages(plan(10), tmp_path, log=lambda line: None)
    run_stages(plan(10), tmp_path, log=lambda line: None)
    assert calls == ["teacher", "finetune", "moe"]
    assert (tmp_path / "teacher.out").exists()  # a first run keeps what it finds (a pre-training run resumes)
    run_stages(plan(20), tmp_path, log=lambda line: None)
    assert calls == ["teacher", "finetune", "moe", "teacher", "finetune"]
    assert not (tmp_path / "teacher.out").exists()  # removed before the rerun with new settings


def test_jobs_run_in_their_slots_and_a_failed_one_is_named(tmp_path):
    """Each job sees its slot's thread count and cores; a failure is raised with its name, the jobs that finished
    stay done (skipped on rerun) and the failed one runs again."""
    probe = "import os; print(os.environ['OMP_NUM_THREADS'], len(os.sched_getaffinity(0)))"

    def plan(fail: bool) -> list[Stage]:
        return [Stage(name, {"job": name}, command([sys.executable, "-c", code]), job=True) for name, code in
                [("a", probe), ("b", probe), ("c", "raise SystemExit(3)" if fail else "pass")]]

    lines = []
    with pytest.raises(StageFailed, match="c failed: exit status 3"):
        run_stages(plan(True), tmp_path, log=lines.append, slots=make_slots(2, 1))
    for name in ("a", "b"):
        assert (tmp_path / "logs" / f"{name}.log").read_text().splitlines()[-1] == "1 1"
    run_stages(plan(False), tmp_path, log=lines.append, slots=make_slots(2, 1))
    assert [line for line in lines if "skipped" in line] == [f"[protocol {i}/3] {n}: done in an earlier run, skipped"
                                                             for i, n in ((1, "a"), (2, "b"))]


def test_ablation_adds_one_tcd_run_per_location_with_it_off(tmp_path):
    preset = load_preset(TINY, ["--ablate=[trunk, attention]"])
    rows, plan = stages(preset, tmp_path)
    assert [m.name for m in rows] == ["teacher", "moe", "tcd", "tcd-no_trunk", "tcd-no_attention", "scratch"]
    pretrain = {s.name: s.key for s in plan if s.name.startswith("pretrain")}
    tcd, no_trunk = pretrain["pretrain tcd"], pretrain["pretrain tcd-no_trunk"]
    run_dir = tmp_path / "pretrain" / "tcd-no_trunk"
    assert no_trunk["overrides"] == [*tcd["overrides"][:-2], "--distill.trunk.enabled=False", f"--run_dir={run_dir}",
                                     "--logging.progress_bar=False"]
    assert f"--distill.teacher={tmp_path / 'pretrain' / 'teacher'}" in no_trunk["overrides"]
    finetunes = [s.name for s in plan if s.name.startswith("finetune")]
    assert finetunes[-4:] == [f"finetune {model} movie_reviews_full lr 0.001 seed {seed}"
                              for model in ("tcd-no_attention", "scratch") for seed in (1, 2)]
    assert all(s.job for s in plan if s.name.startswith(("finetune", "probe")))


def test_ablate_without_locations_drops_each_enabled_one():
    no_attention = f"--tcd.overrides=[{BUDGET}, --distill.attention.enabled=False]"
    assert load_preset(TINY, ablate=[]).ablate == ["trunk", "residual_inner", "attention"]
    assert load_preset(TINY, [no_attention], ablate=[]).ablate == ["trunk", "residual_inner"]
    assert load_preset(TINY, ["--ablate=[trunk]"], ablate=["attention"]).ablate == ["attention"]
    with pytest.raises(SpecError, match=r"ablate: \['attention'\] not enabled"):
        load_preset(TINY, [no_attention], ablate=["attention"])


def test_ablating_the_only_enabled_location_is_refused():
    off = "--distill.attention.enabled=False, --distill.residual_inner.enabled=False"
    with pytest.raises(SpecError, match="ablate: without trunk, its only enabled location, the TCD student has"):
        load_preset(TINY, [f"--tcd.overrides=[{BUDGET}, {off}]"], ablate=["trunk"])


@pytest.mark.parametrize("override, message", [
    ("--moe.overrides=[--train.steps=9]", "moe and tcd must differ only by distillation; they differ in: train"),
    (f"--tcd.overrides=[{BUDGET}, --model.moe.num_experts=2]", "they differ in: model"),
    ("--ablate=[nowhere]", "ablate"),
    ("--finetune.seeds=[]", "finetune.seeds"),
    ("--finetune.lr=inf", "finetune.lr.0: Input should be a finite number"),
])
def test_preset_refuses_an_unfair_or_invalid_comparison(override, message):
    with pytest.raises(SpecError, match=message):
        load_preset(TINY, [override])


def test_a_given_tcd_run_must_come_from_the_given_teacher(tcd_run, tmp_path):
    with pytest.raises(SpecError, match="not the teacher's run"):
        load_preset(TINY, ["--tcd.spec=null", f"--tcd.run={tcd_run}"])


@pytest.mark.parametrize("name", ["small", "teacher_strength"])
def test_the_cluster_presets_are_fair_comparisons(name, tmp_path, monkeypatch):
    """The cluster presets take their teacher as a trained run, whose tokenizer their students use: without one,
    the preset is refused naming it; with a stand-in (its spec and the checkpoints the strengths name), the
    comparison passes its checks, and the stand-in's empty tokenizer folder is what the input check names."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"teacher: run: runs/teacher_small is not a run directory of ours"):
        load_preset(name)
    teacher = tmp_path / "runs" / "teacher_small"
    (teacher / "tokenizer").mkdir(parents=True)
    (teacher / "spec.yaml").write_text((PRESETS / "teacher_small.yaml").read_text())
    for step in (4000, 10000, 20000, 30000):
        (teacher / "checkpoints" / f"step_{step}").mkdir(parents=True)
    preset = validate(Preset, yaml.safe_load((PRESETS / f"protocol_{name}.yaml").read_text()))
    check_comparison(preset, stage_specs(preset))
    assert preset.finetune.lr == [3e-5, 1e-4, 3e-4]
    with pytest.raises(SpecError, match=r"moe: data.tokenizer.path: .*teacher_small/tokenizer holds no tokenizer"):
        load_preset(name)


def test_teacher_strengths_must_be_checkpoints_with_a_validation_loss():
    with pytest.raises(SpecError, match=r"teacher_strengths: \[6\] are not teacher steps with a checkpoint"):
        load_preset(TINY, ["--teacher_strengths=[4, 6]"])  # the tiny preset's teacher: both every 4 steps


def test_a_given_run_is_read_as_its_latest_checkpoint_says(teacher_run, tmp_path):
    """A later launch may rewrite RUN/spec.yaml (a relaunch that changed the lr, say); the protocol compares and
    describes the model its latest checkpoint holds."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    rewritten = yaml.safe_load((teacher / "spec.yaml").read_text())
    trained_lr, rewritten["optim"]["lr"] = rewritten["optim"]["lr"], 0.123
    (teacher / "spec.yaml").write_text(yaml.safe_dump(rewritten))
    preset = validate(Preset, {**yaml.safe_load(TINY.read_text()), "teacher": {"run": str(teacher)}})
    assert stage_specs(preset)["teacher"].optim.lr == trained_lr != 0.123
