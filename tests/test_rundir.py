"""A run directory nothing can damage: self-describing checkpoints, relaunches with a changed spec (continued,
refused, restarted), file-system faults during a run, a teacher checkpoint found incomplete before launch, and
checkpoints sealed from what each rank wrote. Real launches over gloo CPU ranks, real files (a small tmpfs for a
full disk, a read-only mount for a run directory that cannot be written)."""

import hashlib
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import LAUNCH_ENV, REPO, STUDENT_TCD, TEACHER, fast, launch
from tcd_ds.distill.teacher import locate_teacher
from tcd_ds.hf.convert import convert
from tcd_ds.rundir import Checkpoint, RunDir
from tcd_ds.rundir.layout import MANIFEST
from tcd_ds.rundir.relaunch import RelaunchRefused, is_identity, plan_relaunch


def tree_hash(path: Path) -> str:
    """Every path under `path` and every file's bytes."""
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def assert_one_line_no_traceback(proc, *needles: str) -> str:
    """The lines naming the problem (one distinct line, printed once per rank at most), and no traceback."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-4000:]
    lines = {line.strip() for line in out.splitlines() if all(n in line for n in needles)}
    assert len(lines) == 1, (needles, out[-4000:])
    return lines.pop()


def sealed_steps(run_dir: Path) -> list[int]:
    run = RunDir(run_dir)
    return [s for s in run.steps() if run.checkpoint(s).problem() is None]


def assert_every_checkpoint_converts(run_dir: Path, out: Path) -> None:
    steps = sealed_steps(run_dir)
    assert steps
    for step in steps:
        convert(run_dir, out / f"step_{step}", tag=f"step_{step}")
        assert (out / f"step_{step}" / "model.safetensors").is_file()


@contextmanager
def mounted_tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# --- the rule: identity fields are refused, the rest continue -------------------------------------------------


@pytest.mark.parametrize("key, identity", [
    ("model.hidden_size", True), ("model.moe.num_experts", True), ("model.dropout", True), ("data.seq_len", True),
    ("data.tokenizer.vocab_size", True), ("model.moe.ep_size", False), ("optim.lr", False), ("train.steps", False),
    ("checkpoint.every", False), ("logging.every", False), ("data.train", False), ("distill.trunk.weight", False),
])
def test_identity_fields_follow_one_rule(key, identity):
    assert is_identity(key) is identity


def test_a_checkpoint_without_its_own_spec_falls_back_to_the_run_spec(teacher_run, tmp_path):
    """Checkpoints written before checkpoints carried their spec: no spec.yaml inside, no tokenizer fingerprint."""
    run_dir = tmp_path / "old"
    shutil.copytree(teacher_run, run_dir)
    for step in RunDir(run_dir).steps():
        ckpt = RunDir(run_dir).checkpoint(step)
        manifest = ckpt.manifest()
        ckpt.spec_file.unlink()
        del manifest["files"]["spec.yaml"], manifest["tokenizer"]
        (ckpt.dir / MANIFEST).write_text(json.dumps(manifest))
    assert_every_checkpoint_converts(run_dir, tmp_path / "hf")
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    spec["model"]["hidden_size"] = 128
    with pytest.raises(RelaunchRefused, match="model.hidden_size: step_12 has 64, this launch has 128"):
        plan_relaunch(RunDir(run_dir), spec, "any fingerprint", restart=False)


def test_conversion_and_the_teacher_read_the_checkpoints_spec_not_the_runs(teacher_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(teacher_run, run_dir)
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    spec["model"]["hidden_size"] = 128  # what a damaged or later run-level spec may say
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert_every_checkpoint_converts(run_dir, tmp_path / "hf")
    convert(run_dir / "checkpoints" / "step_8", tmp_path / "hf_tag_dir")  # a tag directory, itself with a spec
    assert json.loads((tmp_path / "hf_tag_dir" / "config.json").read_text())["hidden_size"] == 64
    config, _ = locate_teacher(run_dir, None).config()
    assert config.hidden_size == 64


# --- relaunches: launches of the real launcher ----------------------------------------------------------------


def test_a_relaunch_changing_the_lr_continues_and_keeps_the_history(teacher_run, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(teacher_run, run_dir)
    proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=16), "--checkpoint.keep_last=3", "--optim.lr=0.002")
    assert "under a changed spec: optim.lr: 0.001 -> 0.002" in proc.stdout
    assert "under a changed spec: train.steps: 12 -> 16" in proc.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step_12'}" in proc.stdout
    history = sorted((run_dir / "spec_history").glob("*.yaml"))
    assert [yaml.safe_load(p.read_text())["optim"]["lr"] for p in history] == [0.001, 0.002]
    lrs = {s: Checkpoint(run_dir, f"step_{s}").read_spec()[0]["optim"]["lr"] for s in sealed_steps(run_dir)}
    assert lrs == {8: 0.001, 12: 0.001, 16: 0.002}
    assert_every_checkpoint_converts(run_dir, tmp_path / "hf")


def test_a_relaunch_changing_the_model_is_refused_untouched_then_restarted(teacher_run, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(teacher_run, run_dir)
    before = tree_hash(run_dir)

    # Refused by the launcher before any process group: one line per identity field.
    proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=16), "--model.hidden_size=128", "--data.seq_len=32",
                  "--optim.lr=0.002", check=False)
    assert proc.returncode == 2
    assert_one_line_no_traceback(proc, "model.hidden_size: step_12 has 64, this launch has 128")
    assert_one_line_no_traceback(proc, "data.seq_len: step_12 has 64, this launch has 32")
    assert_one_line_no_traceback(proc, "--restart")
    assert "optim.lr" not in proc.stderr
    assert tree_hash(run_dir) == before

    # Another tokenizer (trained from other text) is only known once built: refused by the trainer, still
    # before anything is written.
    more_text = "--data.train=[bundled:wiki/train.txt, bundled:wiki/validation.txt]"
    proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=16), more_text, check=False)
    assert proc.returncode == 2
    assert_one_line_no_traceback(proc, "tokenizer: step_12 was trained with tokenizer")
    assert tree_hash(run_dir) == before

    # --restart: the earlier run moves aside whole, a fresh one starts in its place.
    proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=4), "--model.hidden_size=128", "--restart")
    earlier = run_dir / "restarts" / "1"
    assert f"is now {earlier}" in proc.stdout and "resumed from" not in proc.stdout
    assert tree_hash(earlier) == before
    assert sealed_steps(run_dir) == [4] and sealed_steps(earlier) == [8, 12]
    assert Checkpoint(run_dir, "step_4").read_spec()[1].hidden_size == 128
    assert_every_checkpoint_converts(earlier, tmp_path / "hf_earlier")
    assert_every_checkpoint_converts(run_dir, tmp_path / "hf_new")


# --- file-system faults during a run --------------------------------------------------------------------------


def test_a_full_disk_during_a_save_ends_every_rank_with_one_line(cache_dir, tmp_path):
    """A tmpfs with room for one checkpoint: the save of step 8 runs out of space."""
    with mounted_tmpfs(tmp_path / "small", "6m") as disk:
        run_dir = disk / "run"
        proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=8), check=False)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        line = assert_one_line_no_traceback(proc, "file system fault")
        assert "No space left on device" in line and str(run_dir / "checkpoints" / "step_8") in line
        assert line.endswith(f"last complete checkpoint: {run_dir / 'checkpoints' / 'step_4'}")
        assert sealed_steps(run_dir) == [4] and RunDir(run_dir).latest_tag() == "step_4"
        kept = tmp_path / "kept"
        shutil.copytree(run_dir, kept)

    proc = launch(TEACHER, *fast(kept, cache_dir, steps=8))  # on a disk with room: resumes from step 4
    assert "skipping checkpoint" in proc.stdout and f"resumed from {kept / 'checkpoints' / 'step_4'}" in proc.stdout
    assert_every_checkpoint_converts(kept, tmp_path / "hf")


def test_a_read_only_run_dir_ends_every_rank_with_one_line(teacher_run, cache_dir, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "64m") as disk:
        run_dir = disk / "run"
        shutil.copytree(teacher_run, run_dir)
        before = tree_hash(run_dir)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=16), check=False)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        line = assert_one_line_no_traceback(proc, "file system fault")
        assert "Read-only file system" in line and str(run_dir) in line
        assert line.endswith(f"last complete checkpoint: {run_dir / 'checkpoints' / 'step_12'}")
        assert tree_hash(run_dir) == before
        assert_every_checkpoint_converts(run_dir, tmp_path / "hf")


def test_a_metrics_file_that_cannot_be_used_ends_every_rank_with_one_line(cache_dir, tmp_path):
    """Only rank 0 reads and writes metrics; every rank ends with its one line."""
    run_dir = tmp_path / "run"
    (run_dir / "metrics.jsonl").mkdir(parents=True)  # a path of the wrong kind
    proc = launch(TEACHER, *fast(run_dir, cache_dir, steps=8), check=False)
    assert proc.returncode == 1
    line = assert_one_line_no_traceback(proc, "file system fault")
    assert f"{run_dir / 'metrics.jsonl'}: Is a directory" in line
    assert line.endswith("last complete checkpoint: none")
    assert sealed_steps(run_dir) == []


# --- the teacher, before launch -------------------------------------------------------------------------------


def test_an_incomplete_teacher_checkpoint_is_refused_before_launch(teacher_run, cache_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    victim = teacher / "checkpoints" / "step_12" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    # launchers/pretrain.py run directly: the refusal must come before DeepSpeed or any process group starts.
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--spec", str(STUDENT_TCD),
         *fast(tmp_path / "student", cache_dir), f"--distill.teacher={teacher}", "--model.moe.ep_size=1"],
        cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    line = assert_one_line_no_traceback(proc, "distill.teacher", "incomplete checkpoint")
    assert str(victim) in line and "truncated" in line
    assert not (tmp_path / "student").exists()


# --- sealing: each rank's own files -----------------------------------------------------------------------------


def test_a_narrower_teacher_trains_and_each_rank_seals_its_own_files(teacher_run, cache_dir, tmp_path):
    """A student twice the teacher's width (MoE, ep_size 2: expert files from both ranks); the manifest lists
    exactly the files in each tag directory, from records the writing ranks made."""
    run_dir = tmp_path / "wide"
    proc = launch(STUDENT_TCD, *fast(run_dir, cache_dir), f"--distill.teacher={teacher_run}",
                  "--model.hidden_size=128", "--model.intermediate_size=256")
    assert "finished" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/trunk"] > 0 and r["loss/residual_inner"] > 0 for r in records)
    for step in (4, 8):
        ckpt = RunDir(run_dir).checkpoint(step)
        on_disk = {p.name for p in ckpt.dir.iterdir()} - {MANIFEST}
        assert set(ckpt.manifest()["files"]) == on_disk
        assert {"spec.yaml", "mp_rank_00_model_states.pt", "layer_0_expert_3_mp_rank_00_model_states.pt"} <= on_disk
        assert ckpt.problem() is None
    assert_every_checkpoint_converts(run_dir, tmp_path / "hf")
