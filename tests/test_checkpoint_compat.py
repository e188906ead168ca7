"""Checkpoints written before the experts were stored packed (tcd_ds at b3d0693: one parameter per expert)
resume exactly under today's code, ZeRO-2 optimizer state included, on real DeepSpeed engines over 2 CPU ranks
at ep_size 2; the converter reads the weights of both, from the module files and from the ZeRO masters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_across_versions import model_spec
from tcd_ds.rundir.layout import Checkpoint
from tcd_ds.rundir.weights import fp32_master_weights, full_state_dict

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

    ckpt = tmp_path / "run"
    run(old, "save", ckpt)  # old code: one step, checkpoint, and the weights after a second step
    names = {p.name for p in (ckpt / "checkpoints" / "t").iterdir()}
    assert {f"layer_{k}_expert_{g}_mp_rank_00_model_states.pt" for k in range(2) for g in range(4)} <= names
    run(REPO, "resume", ckpt)  # today's code: load it (module, experts, ZeRO shards), the same second step
    for rank in range(2):
        expected = torch.load(ckpt / f"save.rank{rank}.pt", weights_only=True)
        resumed = torch.load(ckpt / f"resume.rank{rank}.pt", weights_only=True)
        assert resumed.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)

    # Conversion's two sources agree on both checkpoints: module + expert files, and the fp32 masters of the
    # ZeRO shards (what a bf16 run converts from), per-expert names before, packed ones since.
    spec = model_spec()
    for tag in ("t", "new"):
        checkpoint = Checkpoint(ckpt, tag)
        from_files, _ = full_state_dict(checkpoint, spec, "fp32")
        masters = fp32_master_weights(checkpoint, "fp32", 2, spec)
        experts = {name for name in from_files if ".deepspeed_experts." in name}
        assert len(experts) == 2 * 4 * 4 and experts <= masters.keys()
        assert masters.keys() <= from_files.keys()
        for name, tensor in masters.items():
            torch.testing.assert_close(tensor.view(from_files[name].shape), from_files[name], rtol=0, atol=0,
                                       msg=f"{tag}: {name}")
