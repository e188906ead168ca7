"""Sweeps: the shipped sweep files are valid W&B sweeps whose parameters the run spec accepts; the offline driver
passes what `wandb agent` passes, feeds hyperband the trials' histories, and runs a real two-trial sweep."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from conftest import REPO, free_port
from tcd_ds.cli import sweep as sweep_local
from tcd_ds.resources import PRESETS, find_file
from tcd_ds.spec import load_spec
from tcd_ds.train.metrics import read_metrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sweeps 0.2.0's pydantic-1 style model
    from sweeps import RunState, SweepConfig, stop_runs


SWEEP_FILES = sorted((PRESETS / "sweeps").glob("*.yaml"))


def candidates(param: dict) -> list:
    if "values" in param:
        return param["values"]
    if "value" in param:
        return [param["value"]]
    return [param["min"], param["max"]]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid_and_their_parameters_exist(path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    SweepConfig(sweep)  # W&B's sweep schema
    command = sweep["command"]
    assert command[:2] == ["${env}", "deepspeed"] and command[-1] == "${args}"
    assert command[command.index("--module") + 1] == "tcd_ds.cli.pretrain"  # runs from an installed wheel
    spec_file = find_file(command[command.index("--spec") + 1], "spec")
    fixed = [arg for arg in command[command.index("--spec") + 2:-1]]
    if "distill" in yaml.safe_load(spec_file.read_text()):
        fixed.append(f"--distill.teacher={tmp_path}")
    for name, param in sweep["parameters"].items():
        for value in candidates(param):
            (arg,) = create_sweep_command_args({"args": {name: {"value": value}}})["args"]  # the agent's form
            spec = load_spec(spec_file, [*fixed, arg])
            resolved = spec.model_dump()
            for part in name.split("."):
                resolved = resolved[part]
            assert resolved == value, (name, value)


def test_trial_command_substitutes_like_the_agent():
    sweep = {"program": "launchers/pretrain.py", "command": ["${env}", "deepspeed", "--num_gpus=2", "${program}",
                                                            "--spec", "s.yaml", "${args}"]}
    params = {"distill.trunk.weight": 0.5, "distill.attention.enabled": False, "optim.lr": 3e-05, "x.tags": ["a"]}
    command = sweep_local.trial_command(sweep, params, ["--run_dir=r"])
    agent_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    assert command == ["/usr/bin/env", "deepspeed", "--num_gpus=2", "launchers/pretrain.py", "--spec", "s.yaml",
                       *agent_args, "--run_dir=r"]
    assert "--distill.attention.enabled=False" in command


HYPERBAND = {
    "method": "grid", "metric": {"name": "val/loss/mlm", "goal": "minimize"},
    "parameters": {"optim.lr": {"values": [1e-3, 1e-4]}},
    "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
}


def records(losses: list[float]) -> list[dict]:
    """metrics.jsonl records: training logs between evaluations, as the trainer writes them."""
    out = []
    for i, loss in enumerate(losses):
        out += [{"step": 10 * i + 5, "loss/mlm": 9.0}, {"step": 10 * i + 10, "loss/mlm": 8.0, "val/loss/mlm": loss}]
    return out


def test_hyperband_stops_a_trial_behind_the_finished_ones():
    # bands at 1, 2, 4 evaluations; with eta 2 a running trial must be in the best half at each band it reached
    done = [sweep_local.sweep_run(f"t{i}", {}, RunState.finished, records(h)) for i, h in
            enumerate([[7.0, 6.0, 5.0], [7.5, 6.5, 6.0]])]
    behind = sweep_local.sweep_run("behind", {}, RunState.running, records([7.2, 7.1]))
    ahead = sweep_local.sweep_run("ahead", {}, RunState.running, records([7.2, 6.2]))
    assert behind.history and behind.summary_metrics["val/loss/mlm"] == 7.1
    assert [r.name for r in stop_runs(HYPERBAND, done + [behind])] == ["behind"]
    assert stop_runs(HYPERBAND, done + [ahead]) == []


def test_local_sweep_of_two_trials_ranks_them_by_the_metric(tmp_path, cache_dir):
    sweep = {
        "method": "grid",
        "metric": {"name": "val/loss/mlm", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [0.01, 1.0e-6]}},
        "command": [
            "${env}", sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2",
            f"--master_port={free_port()}", "--module", "tcd_ds.cli.pretrain", "--spec", "teacher_tiny",
            f"--data.cache_dir={cache_dir}", "--train.steps=6", "--train.eval_every=3", "--logging.every=3",
            "--checkpoint.every=6", "--optim.warmup_steps=1", "--logging.wandb.enabled=True",
            "--logging.wandb.mode=online", "${args}",  # the driver's offline must win: there is no network
        ],
    }
    sweep_file, out = tmp_path / "lr.yaml", tmp_path / "sweep"
    sweep_file.write_text(yaml.safe_dump(sweep))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sweep_local.py"), str(sweep_file), "--trials", "3", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "search space is exhausted" in proc.stdout  # a grid of two, asked for three

    board = json.loads((out / "leaderboard.json").read_text())
    assert [row["state"] for row in board["trials"]] == ["finished", "finished"]
    finals = {}
    for row in board["trials"]:
        trial_dir = Path(row["run_dir"])
        evals = [r["val/loss/mlm"] for r in read_metrics(trial_dir / "metrics.jsonl") if "val/loss/mlm" in r]
        assert len(evals) == 2
        finals[row["trial"]] = evals[-1]
        assert row["metric"] == evals[-1]
        resolved = yaml.safe_load((trial_dir / "spec.yaml").read_text())
        assert resolved["optim"]["lr"] == row["params"]["optim.lr"]
        assert resolved["run_dir"] == str(trial_dir)
        assert len(list((trial_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(row["params"]["optim.lr"] for row in board["trials"]) == [1.0e-6, 0.01]
    ranked = [row["trial"] for row in board["trials"]]
    assert ranked == sorted(finals, key=finals.get)
    printed = [line.split()[1] for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert printed == ranked


def write_sweep(tmp_path, parameters: dict, command: list[str]) -> str:
    sweep = {"method": "grid", "metric": {"name": "val/loss/mlm", "goal": "minimize"}, "parameters": parameters,
             "command": command}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_a_sweep_over_a_parameter_the_spec_lacks_is_refused_before_any_trial(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optim.lrr": {"values": [1e-3]}}, ["${env}", "false", "${args}"])
    assert sweep_local.main([path, "--trials", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "parameters ['optim.lrr'] are not fields of the run spec" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_sweep_in_which_no_trial_finished_exits_non_zero(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optim.lr": {"values": [1e-3, 1e-4]}}, ["${env}", "false", "${args}"])
    assert sweep_local.main([path, "--trials", "2", "--out", str(tmp_path / "out")]) == 1
    assert "no trial finished" in capsys.readouterr().err
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert [row["state"] for row in board["trials"]] == ["failed", "failed"]
