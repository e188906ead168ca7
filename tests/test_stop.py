"""Stopping a run as `wandb agent` does (SIGTERM to the `deepspeed` runner, nothing else): every rank exits, the
latest checkpoint is complete, and the same command resumes from it and continues the same W&B run."""

import os
import signal
import subprocess
import time

import psutil

from conftest import LAUNCH_ENV, REPO, launch_command
from tcd_ds.train.metrics import read_metrics
from test_wandb import launch_with_env, read_wandb_records
from tcd_ds.resources import PRESETS

TEACHER = PRESETS / "teacher_tiny.yaml"


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Processes still running; a zombie has exited (only its parent's bookkeeping is left)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sigterm_to_runner_leaves_no_rank_and_a_resumable_checkpoint(tmp_path, cache_dir):
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}
    args = [
        f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", "--train.steps=100000", "--logging.every=1",
        "--train.eval_every=100000", "--checkpoint.every=2", "--checkpoint.keep_last=2",
        "--logging.progress_bar=False", "--logging.wandb.enabled=True",
    ]
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        runner = subprocess.Popen(
            launch_command(TEACHER, *args), cwd=REPO, env={**LAUNCH_ENV, **wandb_env}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    metrics = run_dir / "metrics.jsonl"
    try:
        def trained_a_few_steps() -> bool:
            assert runner.poll() is None, log_path.read_text()[-3000:]
            return metrics.exists() and len(metrics.read_text().splitlines()) >= 5

        wait_until(trained_a_few_steps, 180, "five logged steps")
        descendants = psutil.Process(runner.pid).children(recursive=True)  # launcher, ranks, wandb service
        assert len(descendants) >= 3
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        wait_until(lambda: not alive(descendants), 120, f"ranks to exit: {alive(descendants)}")
    finally:
        if alive([p for p in psutil.process_iter() if _in_group(p, runner.pid)]):
            os.killpg(runner.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "[tcd-ds] stopped (" in text  # rank 0 left the loop on the stop request

    # `latest` names a tag with every rank's files, at or before the last logged step
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    saved = int(tag.removeprefix("step_"))
    files = {p.name for p in (ckpt / tag).iterdir()}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "manifest.json"} <= files
    logged = [r["step"] for r in read_metrics(metrics)]
    assert saved >= 2 and saved % 2 == 0 and saved <= logged[-1]

    # the same command resumes from it (two more steps this launch) and continues the same W&B run
    proc = launch_with_env(wandb_env, TEACHER, *args, "--train.steps_per_launch=2")
    assert f"resumed from {ckpt / tag}" in proc.stdout
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, saved + 3))
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    for run in runs:  # both launches closed their W&B run
        (wandb_file,) = run.glob("*.wandb")
        assert "exit" in {r.WhichOneof("record_type") for r in read_wandb_records(wandb_file)}


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid
    except OSError:
        return False
