"""Tests run DeepSpeed on CPU ranks over gloo, offline; these defaults hold before any import of deepspeed."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tcd_ds.resources import PRESETS
from tcd_ds.train.launch import deepspeed_command, free_port  # noqa: F401  (tests import free_port from here)
from tcd_ds.train.metrics import read_metrics

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TCD_DS_ALLOW_CPU_ON_GPU", "1")  # the tests run CPU ranks on purpose, on any machine
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def launch_command(spec: str | Path, *overrides: str, ranks: int = 2, runner_args: tuple[str, ...] = ()) -> list[str]:
    """Pre-training exactly as a user runs it: through the `deepspeed` runner (`--module tcd_ds.cli.pretrain`)."""
    if not any(a.startswith("--hostfile") for a in runner_args):
        runner_args = ("--num_gpus", str(ranks), *runner_args)
    return deepspeed_command(list(runner_args), spec, list(overrides))


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(spec: str | Path, *overrides: str, ranks: int = 2, cwd: Path = REPO, timeout: int = 600, check=True,
           runner_args: tuple[str, ...] = ()):
    cmd = launch_command(spec, *overrides, ranks=ranks, runner_args=runner_args)
    proc = subprocess.run(cmd, cwd=cwd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/data cache for the whole session: the bundled corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


# Tiny runs shared by the end-to-end tests: each launch costs seconds, so a session makes each once.
TEACHER = PRESETS / "teacher_tiny.yaml"
STUDENT_MOE = PRESETS / "student_tiny_moe.yaml"
STUDENT_TCD = PRESETS / "student_tiny_tcd.yaml"
LOSSES = ("loss/mlm", "loss/balance", "loss/trunk", "loss/residual_inner", "loss/attention", "loss/total")


def fast(run_dir: Path, cache_dir: Path, steps: int = 8) -> list[str]:
    return [
        f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", f"--train.steps={steps}", "--logging.every=1",
        "--train.eval_every=4", "--checkpoint.every=4", "--logging.progress_bar=False",
    ]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every module tensor of the latest checkpoint: shared weights and each expert file."""
    ckpt = run_dir / "checkpoints"
    tag_dir = ckpt / (ckpt / "latest").read_text().strip()
    weights = {}
    for path in sorted(tag_dir.glob("*model_states.pt")):
        state = torch.load(path, weights_only=True, map_location="cpu")
        for name, tensor in state.get("module", state).items():  # expert files hold a bare state dict
            weights[f"{path.name}:{name}"] = tensor
    return weights


def losses_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "val/"))} for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher")
    launch(TEACHER, *fast(run_dir, cache_dir, steps=12), "--checkpoint.keep_last=2")
    return run_dir


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory, cache_dir) -> Path:
    """The MoE baseline of `tcd_run`: the same student without its teacher."""
    run_dir = tmp_path_factory.mktemp("moe")
    launch(STUDENT_MOE, *fast(run_dir, cache_dir))
    return run_dir


@pytest.fixture(scope="session")
def tcd_run(tmp_path_factory, cache_dir, teacher_run) -> Path:
    run_dir = tmp_path_factory.mktemp("tcd")
    launch(STUDENT_TCD, *fast(run_dir, cache_dir), f"--distill.teacher={teacher_run}")
    return run_dir


def run_ok(argv: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output unless it exits 0."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> tuple[Path, dict]:
    """The package as users meet it on a cluster (tests/test_wheel.py, and the protocol in tests/test_protocol.py):
    a wheel built from this checkout (`pip wheel --no-deps .`), installed non-editable into a fresh virtual
    environment that sees the suite's installed dependencies (--system-site-packages: nothing is downloaded; and
    `--no-deps`, since the venv's own older setuptools would not satisfy torch's metadata).
    Returns (the venv's bin directory, an environment without the checkout on any path)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO], root,
        env)
    (wheel,) = (root / "dist").glob("tcd_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tcd_ds/presets/protocol_tiny.yaml", "tcd_ds/presets/sweeps/teacher_strength.yaml",
            "tcd_ds/bundled/wiki/train.txt", "tcd_ds/bundled/tasks/movie_reviews/task.yaml"} <= names
    run_ok([sys.executable, "-m", "venv", "--system-site-packages", root / "venv"], root, env)
    bin_dir = root / "venv" / "bin"
    run_ok([bin_dir / "python", "-m", "pip", "install", "--no-index", "--no-deps", wheel], root, env)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return bin_dir, env
