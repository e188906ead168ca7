"""End to end through the `deepspeed` launcher on 2 CPU ranks: dense teacher pre-training, the MoE baseline
and MoE+TCD, exact resume, and TCD with zero weights reproducing the baseline."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import (
    LOSSES, REPO, STUDENT_TCD, TEACHER, fast, final_weights, free_port, launch, losses_by_step,
)
from tcd_ds.resources import BUNDLED
from tcd_ds.train.metrics import read_metrics


def test_teacher_run_trains_logs_and_checkpoints(teacher_run):
    records = read_metrics(teacher_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss/mlm"] < records[0]["loss/mlm"] - 0.3
    for r in records:
        assert {"loss/mlm", "lr", "tokens_per_s", "grad_norm"} <= r.keys() and math.isfinite(r["loss/mlm"])
    evaluated = [r["step"] for r in records if "val/loss/mlm" in r]
    assert evaluated == [4, 8, 12]
    assert 0.0 <= records[-1]["val/accuracy"] <= 1.0
    # keep_last=2 of the checkpoints at 4, 8, 12; `latest` names the newest
    assert sorted(p.name for p in (teacher_run / "checkpoints").glob("step_*")) == ["step_12", "step_8"]
    assert (teacher_run / "checkpoints" / "latest").read_text().strip() == "step_12"
    assert "hidden_size: 64" in (teacher_run / "spec.yaml").read_text()
    tokenizer = AutoTokenizer.from_pretrained(teacher_run / "tokenizer")
    assert tokenizer.mask_token == "[MASK]" and len(tokenizer) == 2000


def test_rerunning_a_finished_run_changes_nothing(teacher_run, cache_dir):
    before = final_weights(teacher_run)
    port = str(free_port())
    launch(TEACHER, *fast(teacher_run, cache_dir, steps=12), runner_args=("--master_port", port))
    after = final_weights(teacher_run)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(read_metrics(teacher_run / "metrics.jsonl")) == 12
    # DeepSpeed's CPU all-reduce buffers (one per rank, in /dev/shm) do not outlive the launch
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_resumed_run_matches_uninterrupted(tmp_path, cache_dir, teacher_run, tcd_run):
    """One launch vs. two (`train.steps_per_launch`): the same losses at every step, the same final weights, for
    the TCD student with its teacher and experts (tests/test_faults.py resumes the dense teacher likewise)."""
    spec, steps, extra, reference = STUDENT_TCD, 8, [f"--distill.teacher={teacher_run}"], tcd_run
    resumed = tmp_path / "resumed"
    for _ in range(2):
        launch(spec, *fast(resumed, cache_dir, steps=steps), *extra, f"--train.steps_per_launch={steps // 2}")
    expected, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in expected:
        assert expected[step].keys() == got[step].keys()
        for name, value in expected[step].items():
            assert got[step][name] == pytest.approx(value, abs=1e-6, rel=0), (step, name)
    ref_weights, res_weights = final_weights(reference), final_weights(resumed)
    assert ref_weights.keys() == res_weights.keys()
    for name in ref_weights:
        assert torch.allclose(ref_weights[name], res_weights[name], rtol=0, atol=1e-6), name


def test_tcd_student_trains_with_falling_relation_losses(tcd_run):
    records = read_metrics(tcd_run / "metrics.jsonl")
    for r in records:
        assert set(LOSSES) <= r.keys()
        assert all(math.isfinite(r[k]) for k in LOSSES)
        for layer in (0, 1):
            load = r[f"moe/load/layer_{layer}"]
            assert len(load) == 4 and sum(load) == pytest.approx(1.0)
            # Routing telemetry, pooled over ranks and the log window: consistent with the load, and the entropy of
            # the mean routing distribution is at least the mean entropy (concavity).
            assert r[f"moe/idle_experts/layer_{layer}"] == load.count(0.0)
            assert 0 <= r[f"moe/dropped/layer_{layer}"] < 1
            assert 0 < r[f"moe/entropy/layer_{layer}"] <= r[f"moe/mean_entropy/layer_{layer}"] + 1e-6
    for name in ("loss/trunk", "loss/residual_inner"):
        assert records[-1][name] < records[0][name] / 2, name
    assert records[-1]["loss/mlm"] < records[0]["loss/mlm"]


def test_zero_relation_weights_give_the_moe_baseline(tmp_path, cache_dir, teacher_run, moe_run):
    baseline, zero = moe_run, tmp_path / "zero"
    launch(
        STUDENT_TCD, *fast(zero, cache_dir), f"--distill.teacher={teacher_run}",
        "--distill.trunk.weight=0", "--distill.residual_inner.weight=0", "--distill.attention.weight=0",
    )
    expected, got = losses_by_step(baseline), losses_by_step(zero)
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    for step in expected:
        for name in ("loss/mlm", "loss/balance", "loss/total", "val/loss/mlm"):
            if name in expected[step]:
                assert got[step][name] == expected[step][name], (step, name)
    ref_weights, zero_weights = final_weights(baseline), final_weights(zero)
    assert all(torch.equal(ref_weights[k], zero_weights[k]) for k in ref_weights)


def test_teacher_of_another_shape_is_refused_before_start(teacher_run):
    proc = subprocess.run(
        [sys.executable, "-m", "tcd_ds.cli.pretrain", "--spec", str(STUDENT_TCD), "--dry-run", "--world-size=2",
         f"--distill.teacher={teacher_run}", "--model.num_heads=4", "--data.tokenizer.vocab_size=1500"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "num_attention_heads: teacher has 2, student has 4" in proc.stderr  # the attention relation is on
    assert "vocab_size: teacher has 2000, student has 1500" in proc.stderr


def test_teacher_with_another_tokenizer_is_refused_before_training(tmp_path, cache_dir, teacher_run):
    """Same vocabulary size, different corpus: only the trained tokenizers tell them apart."""
    run_dir = tmp_path / "student"
    proc = launch(
        STUDENT_TCD, *fast(run_dir, cache_dir), f"--distill.teacher={teacher_run}",
        f"--data.train=[{BUNDLED / 'wiki' / 'validation.txt'}]", check=False,
    )
    assert proc.returncode != 0
    assert "tokenizer: vocabularies differ" in proc.stderr + proc.stdout
    assert not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir / "metrics.jsonl")
