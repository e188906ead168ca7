"""Tests run DeepSpeed on CPU ranks over gloo, offline; these defaults hold before any import of deepspeed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: str | Path, *overrides: str, ranks: int = 2, cwd: Path = REPO, timeout: int = 600, check=True):
    """Run launchers/pretrain.py exactly as a user does: through the `deepspeed` launcher."""
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
        str(REPO / "launchers" / "pretrain.py"), "--spec", str(spec), *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/data cache for the whole session: the bundled corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")
