"""Run a W&B sweep file with no W&B server: the open-source `sweeps` engine (the search W&B runs: grid, random,
bayes; hyperband early stopping) proposes each trial, and each trial is a real launch of the file's command,
as `wandb agent` runs it.

    tcd-ds sweep tcd_relations --trials 8 [--out runs/sweeps/NAME] [--seed N]

The sweep file is a path or a shipped sweep's name (`tcd-ds presets`). Its parameters are checked against the run
spec's fields before the first trial (exit 2 naming the unknown ones); the command exits 1 when no trial finished.

Each trial runs in OUT/trial_NNN (its run dir: `--run_dir`, `--logging.wandb.mode=offline` and
`--logging.progress_bar=False` follow the sweep's `${args}`), and gets its parameters both as `${args}` and in
the file WANDB_SWEEP_PARAM_PATH names, as under the agent. Its result is the last value of the sweep's metric
in its metrics.jsonl. A trial that hyperband stops gets SIGTERM on its `deepspeed` runner, as the agent sends.
The leaderboard is printed and written to OUT/leaderboard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import yaml

from tcd_ds.cli.common import refuse
from tcd_ds.resources import find_file
from tcd_ds.rundir import RunDir
from tcd_ds.spec import RunSpec, SpecError, has_field, read_yaml_mapping

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sweeps 0.2.0 declares its pydantic model in the pydantic-1 style
    from sweeps import RunState, SweepRun, next_run, stop_runs

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb agent's default
ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")
POLL_S = 2.0
EXIT_GRACE_S = 120  # how long the ranks may take to stop after their runner is gone


def plain(value):
    """The engine proposes numpy scalars; the command line, YAML and JSON want Python ones."""
    return value.item() if isinstance(value, np.generic) else value


def trial_command(sweep: dict, params: dict, extra: list[str]) -> list[str]:
    """The sweep's command with wandb agent's macros filled in; `extra` goes last so it wins."""
    macros = {
        "${env}": ["/usr/bin/env"],
        "${interpreter}": [sys.executable],
        "${program}": [sweep["program"]] if "program" in sweep else [],
        "${args}": [f"--{key}={value}" for key, value in params.items()],
    }
    command = []
    for token in map(str, sweep.get("command", DEFAULT_COMMAND)):
        token = ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), token)
        if token in macros:
            command += macros[token]
        elif token.startswith("${"):
            raise SpecError([f"unsupported macro in the sweep's command: {token}"])
        else:
            command.append(token)
    return command + extra


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl as far as it is written (a running trial may be mid-line)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def sweep_run(name: str, config: dict, state: RunState, records: list[dict], stopped: bool = False) -> SweepRun:
    """A trial as the engine sees a W&B run: history = the logged records, summary = each key's last value.
    Given by alias: sweeps 0.2.0 under pydantic 2 silently drops `history`/`summary_metrics` given by name."""
    summary = {key: value for record in records for key, value in record.items()}
    return SweepRun(
        name=name, config=config, state=state, sampledHistory=records, summaryMetrics=summary, stopped=stopped
    )


def group_alive(pgid: int) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (OSError, psutil.Error):
            pass
    return alive


def wait_for_group(pgid: int) -> None:
    """The runner exits before its ranks when it is stopped: wait for the whole trial, so trials never overlap."""
    deadline = time.monotonic() + EXIT_GRACE_S
    while group_alive(pgid):
        if time.monotonic() > deadline:
            print(f"[sweep] trial processes still alive {EXIT_GRACE_S}s after their runner: SIGKILL", flush=True)
            os.killpg(pgid, signal.SIGKILL)
            break
        time.sleep(0.5)


def run_trial(sweep: dict, name: str, config: dict, trial_dir: Path, previous: list[SweepRun]) -> SweepRun:
    params = {key: plain(entry["value"]) for key, entry in config.items()}
    trial_dir.mkdir(parents=True)
    param_file = trial_dir / "sweep_params.yaml"
    param_file.write_text("wandb_version: 1\n\n" + yaml.safe_dump({k: {"value": v} for k, v in params.items()}))
    extra = [f"--run_dir={trial_dir}", "--logging.wandb.mode=offline", "--logging.progress_bar=False"]
    command = trial_command(sweep, params, extra)
    env = {**os.environ, "WANDB_SWEEP_PARAM_PATH": str(param_file)}
    print(f"[sweep] {name}: {' '.join(f'--{k}={v}' for k, v in params.items())}", flush=True)
    metrics = RunDir(trial_dir).metrics_file
    hyperband = "early_terminate" in sweep
    stopped = False
    with open(trial_dir / "launch.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                if hyperband and not stopped and proc.poll() is None:
                    running = sweep_run(name, config, RunState.running, read_records(metrics))
                    if any(run.name == name for run in stop_runs(sweep, previous + [running])):
                        print(f"[sweep] {name}: hyperband stops it", flush=True)
                        proc.send_signal(signal.SIGTERM)
                        stopped = True
        finally:
            if proc.poll() is None:  # the driver itself is being stopped
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            wait_for_group(proc.pid)
    state = RunState.finished if proc.returncode == 0 or stopped else RunState.failed
    if state == RunState.failed:
        print(f"[sweep] {name}: failed (exit {proc.returncode}), see {trial_dir / 'launch.log'}", flush=True)
    return sweep_run(name, config, state, read_records(metrics), stopped)


def final_metric(run: SweepRun, metric: str) -> float | None:
    values = [record[metric] for record in run.history if metric in record]
    return values[-1] if values else None


def leaderboard(runs: list[SweepRun], out: Path, metric: str, goal: str) -> list[dict]:
    """Trials ranked by their final metric (best first); trials without one last."""
    rows = [
        {
            "trial": run.name, "metric": final_metric(run, metric), "state": RunState(run.state).value,
            "stopped_early": run.stopped, "params": {k: plain(e["value"]) for k, e in run.config.items()},
            "run_dir": str(out / run.name),
        }
        for run in runs
    ]
    sign = -1.0 if goal == "maximize" else 1.0
    return sorted(rows, key=lambda row: (row["metric"] is None, sign * (row["metric"] or 0.0)))


def load_sweep(name_or_path: str) -> tuple[Path, dict]:
    """The sweep file and its mapping; a SpecError for a file that is missing, unreadable or not a sweep of the
    run spec's parameters."""
    try:
        path = find_file(name_or_path, "sweep")
    except FileNotFoundError as e:
        raise SpecError([str(e)]) from None
    sweep = read_yaml_mapping(path, "sweep file")
    problems = [f"{path}: no {key}" for key in ("method", "metric", "parameters") if key not in sweep]
    if problems:
        raise SpecError(problems)
    if not isinstance(sweep["metric"], dict) or "name" not in sweep["metric"]:
        raise SpecError([f"{path}: metric must be a mapping with a name"])
    trial_command(sweep, {}, [])  # its macros
    unknown = [key for key in sweep["parameters"] if not has_field(RunSpec, key)]
    if unknown:
        raise SpecError([f"{path}: parameters {unknown} are not fields of the run spec (`tcd-ds pretrain "
                         "--print-schema`)"])
    return path, sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcd-ds sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a W&B sweep YAML file (method, metric, parameters, command, ...) or a "
                        "shipped sweep's name")
    parser.add_argument("--trials", type=int, required=True, help="at most this many trials (grid may end sooner)")
    parser.add_argument("--out", help="sweep directory (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--seed", type=int, help="seed for the random and bayes proposals")
    args = parser.parse_args(argv)

    try:
        path, sweep = load_sweep(args.sweep)
        out = Path(args.out or Path("runs/sweeps") / path.stem)
        if out.exists() and any(out.iterdir()):
            raise SpecError([f"{out} is not empty: pass another --out"])
        next_run(sweep, [], validate=True)  # the engine's own check of the search space
    except SpecError as e:
        return refuse("sweep", e)
    except Exception as e:  # the engine's validation error (jsonschema), naming the bad entry
        return refuse("sweep", SpecError([f"{path}: {str(e).splitlines()[0]}"]))
    if args.seed is not None:
        np.random.seed(args.seed)
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")

    runs: list[SweepRun] = []
    for i in range(args.trials):
        proposal = next_run(sweep, runs, validate=True)
        if proposal is None:
            print("[sweep] the search space is exhausted", flush=True)
            break
        name = f"trial_{i:03d}"
        runs.append(run_trial(sweep, name, proposal.config, out / name, runs))

    rows = leaderboard(runs, out, metric, goal)
    (out / "leaderboard.json").write_text(json.dumps({"sweep": str(path), "metric": metric, "goal": goal,
                                                      "trials": rows}, indent=2) + "\n")
    print(f"\n{'rank':>4}  {'trial':<10} {metric:>14}  state     params")
    for rank, row in enumerate(rows, 1):
        value = "-" if row["metric"] is None else f"{row['metric']:.6g}"
        state = row["state"] + ("*" if row["stopped_early"] else "")
        params = " ".join(f"{k}={v}" for k, v in row["params"].items())
        print(f"{rank:>4}  {row['trial']:<10} {value:>14}  {state:<9} {params}")
    print(f"(* stopped early by hyperband)\nleaderboard: {out / 'leaderboard.json'}")
    finished = [row for row in rows if row["state"] == RunState.finished.value]
    if not finished:
        print(f"[sweep] no trial finished: see the trials' launch.log under {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
