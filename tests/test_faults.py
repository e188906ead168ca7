"""Faults provoked for real: a truncated checkpoint, a killed rank, a 2-node job on one machine, a change of
world size and ep_size, NaN losses inside a real DeepSpeed engine, and a stale op-build lock."""

import os
import shutil
import signal
import subprocess
import time

import psutil
import torch
import torch.multiprocessing as mp

from conftest import (
    LAUNCH_ENV, REPO, STUDENT_TCD, TEACHER, fast, final_weights, free_port, launch, launch_command, losses_by_step,
)
from tcd_ds.checks import STALE_AFTER_MINUTES, warn_on_stale_build_locks
from tcd_ds.train.metrics import read_metrics


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), name


def test_truncated_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, cache_dir, teacher_run):
    run_dir = tmp_path / "run"
    launch(TEACHER, *fast(run_dir, cache_dir, steps=12), "--train.steps_per_launch=8")
    victim = run_dir / "checkpoints" / "step_8" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=12))
    assert "skipping checkpoint" in proc.stdout and "step_8" in proc.stdout and "truncated" in proc.stdout
    assert "resumed from" in proc.stdout and "step_4" in proc.stdout
    # Resumed at 4, it replays 5..12 exactly: every step's losses and the end of the uninterrupted 12-step teacher
    # (tests/test_pretrain.py resumes a TCD student the same way).
    assert_same_weights(final_weights(run_dir), final_weights(teacher_run))
    assert losses_by_step(run_dir) == losses_by_step(teacher_run)


def rank_processes(runner: psutil.Process) -> list[psutil.Process]:
    """The training processes (DeepSpeed's per-node launcher, also a child, is not one)."""
    return [p for p in runner.children(recursive=True) if any(a.startswith("--local_rank=") for a in p.cmdline())]


def test_killed_rank_stops_the_job_and_a_relaunch_ends_where_an_uninterrupted_run_does(tmp_path, cache_dir):
    steps = ["--train.steps=60", "--logging.every=20", "--train.eval_every=1000", "--checkpoint.every=10"]
    common = [f"--data.cache_dir={cache_dir}", "--logging.progress_bar=False", *steps]
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    launch(TEACHER, f"--run_dir={reference}", *common)

    runner = subprocess.Popen(
        launch_command(TEACHER, f"--run_dir={run_dir}", *common), cwd=REPO, env=LAUNCH_ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step_10" / "manifest.json").exists():
            assert runner.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        ranks = rank_processes(psutil.Process(runner.pid))
        assert len(ranks) == 2
        victim = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        assert runner.wait(timeout=120) != 0
        assert time.time() - killed_at < 120
        survivors = [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not survivors
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert 10 <= int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_")) < 60

    launch(TEACHER, f"--run_dir={run_dir}", *common)
    assert_same_weights(final_weights(run_dir), final_weights(reference))


def test_two_nodes_on_one_machine_train_like_one_node(tmp_path, cache_dir, teacher_run, tcd_run):
    """Two launches, one per node of a 2-host hostfile (1 rank each): the expert-parallel group (ep_size 2)
    spans the nodes. Same world size as the 1-node TCD run, so the same losses and weights. Node 1's command
    line differs, as a sweep agent's parameters would reach only its own node: every rank runs rank 0's spec."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    run_dir, port = tmp_path / "two_nodes", str(free_port())
    nodes = [
        subprocess.Popen(
            launch_command(
                STUDENT_TCD, *fast(run_dir, cache_dir), f"--distill.teacher={teacher_run}",
                *(["--optim.lr=0.5", f"--run_dir={tmp_path / 'elsewhere'}"] if k == 1 else []),
                runner_args=("--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
                             "--master_addr", "127.0.0.1", "--master_port", port),
            ),
            cwd=REPO, env=LAUNCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for k in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "rank 1: the run spec resolved here differs from rank 0's" in outputs[1]
    assert not (tmp_path / "elsewhere").exists()
    assert losses_by_step(run_dir) == losses_by_step(tcd_run)
    assert_same_weights(final_weights(run_dir), final_weights(tcd_run))


def test_resume_on_another_world_size_and_ep_size(tmp_path, cache_dir, teacher_run, tcd_run):
    """A 2-rank ep_size-2 checkpoint resumed by 1 rank with ep_size 1: module weights only (every expert file
    back by its global id), a fresh optimizer, a warning, and the data order carries on. With a learning
    rate too small to move an fp32 weight, the weights it saves are the ones it loaded."""
    run_dir = tmp_path / "elastic"
    shutil.copytree(tcd_run, run_dir)
    proc = launch(
        STUDENT_TCD, *fast(run_dir, cache_dir, steps=12), f"--distill.teacher={teacher_run}", "--optim.lr=1e-30",
        "--model.moe.ep_size=1", ranks=1,
    )
    assert "loading the module weights only; the optimizer state starts afresh" in proc.stdout
    assert "'world_size': 2, 'ep_size': 2" in proc.stdout
    assert sorted(losses_by_step(run_dir)) == list(range(1, 13))
    assert_same_weights(final_weights(run_dir), final_weights(tcd_run))
    # Step 9 trains on the samples an uninterrupted run would have reached: finite, and not a replay of step 1.
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert records[9]["loss/mlm"] != records[1]["loss/mlm"]


# --- NaN losses: a real engine on 2 ranks, with the loss of chosen steps made NaN -------------------------

NAN_STEPS = {3, 6, 7, 8}  # 0-based: one isolated, then three in a row


def nan_worker(rank: int, port: int, run_dir: str, cache_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    from tcd_ds.spec import load_spec
    from tcd_ds.train.guard import NonFiniteTraining
    from tcd_ds.train.trainer import Trainer

    spec = load_spec(TEACHER, [f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", "--train.steps=20",
                               "--checkpoint.every=2", "--train.max_skipped_steps=3", "--logging.every=1",
                               "--train.eval_every=100", "--logging.progress_bar=False"])
    trainer = Trainer(spec)
    real_step = trainer.train_step
    real_losses = real_step.losses
    moved, current = {}, {}

    def losses(batch, relation_positions):
        out_ = real_losses(batch, relation_positions)
        if current["step"] in NAN_STEPS:
            out_["total"] = out_["total"] * float("nan")
        return out_

    def step(batches, step_):
        current["step"] = step_
        before = trainer.model.bert.embeddings.word_embeddings.weight.detach().clone()
        terms = real_step(batches, step_)
        moved[step_] = not torch.equal(before, trainer.model.bert.embeddings.word_embeddings.weight)
        return terms

    real_step.losses, trainer.train_step = losses, step
    try:
        trainer.fit()
        raised = None
    except NonFiniteTraining as e:
        raised = str(e)
    if rank == 0:
        torch.save({"moved": moved, "raised": raised, "skipped": trainer.engine.skipped_steps}, out)


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, cache_dir):
    run_dir, out = tmp_path / "run", tmp_path / "rank0.pt"
    mp.spawn(nan_worker, args=(free_port(), str(run_dir), str(cache_dir), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    assert got["moved"] == {s: s not in NAN_STEPS for s in range(9)}  # skipped steps leave the weights alone
    assert got["skipped"] == 4
    assert got["raised"] and "3 steps in a row" in got["raised"] and "stopped at step 9" in got["raised"]
    assert "last good checkpoint: step 8" in got["raised"]
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert records[3]["skipped_steps"] == 0 and records[4]["skipped_steps"] == 1 and records[8]["skipped_steps"] == 3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_8"
    assert (run_dir / "checkpoints" / "step_8" / "manifest.json").exists()


def test_a_stale_op_build_lock_is_named_before_the_launch_waits_on_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, building = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other" / "lock"
    for lock in (stale, building):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 60 * (STALE_AFTER_MINUTES + 5)
    os.utime(stale, (old, old))
    warn_on_stale_build_locks()
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and str(stale) in warnings[0] and "delete" in warnings[0]
