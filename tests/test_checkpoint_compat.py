"""Checkpoints written before the experts were stored packed (tcd_ds at b3d0693: one parameter per expert)
resume exactly under today's code, ZeRO-2 optimizer state included, on real DeepSpeed engines over 2 CPU ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BEFORE_PACKED_EXPERTS = "b3d0693"


def run(code_root: Path, mode: str, directory: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "checkpoint_across_versions.py"), mode,
                           str(directory)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_checkpoint_of_the_per_expert_code_resumes_exactly(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_PACKED_EXPERTS, "tcd_ds"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"no git history to take the code of {BEFORE_PACKED_EXPERTS} from")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    assert "stacked_experts(self.deepspeed_experts)" in (old / "tcd_ds/models/batched_experts.py").read_text()

    ckpt = tmp_path / "ckpt"
    run(old, "save", ckpt)  # old code: one step, checkpoint, and the weights after a second step
    names = {p.name for p in (ckpt / "t").iterdir()}
    assert {f"layer_{k}_expert_{g}_mp_rank_00_model_states.pt" for k in range(2) for g in range(4)} <= names
    run(REPO, "resume", ckpt)  # today's code: load it (module, experts, ZeRO shards), the same second step
    for rank in range(2):
        expected = torch.load(ckpt / f"save.rank{rank}.pt", weights_only=True)
        resumed = torch.load(ckpt / f"resume.rank{rank}.pt", weights_only=True)
        assert resumed.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
