"""Nothing of ours, and nothing of transformers', makes the host wait on the device inside a training step; the
waits left are DeepSpeed's own, on an allow-list. Counted on CPU by `benchmarks.host_syncs` (each counted call is
a stall on a GPU), over real 1-rank launches: a dense teacher, then a TCD student distilled from it."""

import json
import subprocess
import sys

import torch
from deepspeed.accelerator import get_accelerator

from benchmarks.host_syncs import HostSyncs, owner, unexpected
from conftest import LAUNCH_ENV, REPO, STUDENT_TCD, TEACHER


def test_the_counter_sees_each_kind_of_wait_at_its_line():
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        line = sys._getframe().f_lineno
        x.sum().item()
        bool(x.max() > 2)
        x[x > 2].sum()
        x.tolist()
        get_accelerator().synchronize()
        x.nonzero()
        torch.repeat_interleave(x.long())
        torch.nn.functional.one_hot(x.long(), num_classes=6)  # range checks on CPU only: not a GPU stall
        x + 1
    here = "tests/test_host_syncs.py"
    assert syncs.counts == {f"{here}:{line + k}": 1 for k in range(1, 8)}


def counted_launch(spec, out, *overrides) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.host_syncs", "--spec", str(spec), "--out", str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_steps(steps: list[dict]) -> None:
    assert steps and unexpected(steps) == []  # ours and transformers' at zero, DeepSpeed's on the allow-list
    assert all(any(owner(s) == "deepspeed" for s in counts) for counts in steps)  # the counter was on


def test_a_training_step_waits_only_where_deepspeed_does(tmp_path, cache_dir):
    common = [f"--data.cache_dir={cache_dir}", "--logging.progress_bar=False", "--train.eval_every=1000",
              "--checkpoint.every=1000"]
    teacher = counted_launch(TEACHER, tmp_path / "teacher.json", f"--run_dir={tmp_path / 'teacher'}",
                             "--train.steps=4", *common)
    check_steps(teacher["steps"])
    student = counted_launch(STUDENT_TCD, tmp_path / "tcd.json", f"--run_dir={tmp_path / 'tcd'}", "--train.steps=4",
                             "--model.moe.ep_size=1", f"--distill.teacher={tmp_path / 'teacher'}", *common)
    check_steps(student["steps"])
    assert any(s.startswith("deepspeed/moe/") for s in student["steps"][-1])  # the MoE layers ran
