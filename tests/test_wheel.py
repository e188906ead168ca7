"""The package as users meet it on a cluster: a wheel built from this checkout (`pip wheel --no-deps .`), installed
non-editable into a fresh virtual environment, run from an empty directory. Nothing of the checkout is on the path:
the commands, presets and bundled data all come from the wheel. The venv sees the suite's installed dependencies
(torch from the pinned CPU build, deepspeed, ...) through --system-site-packages: nothing is downloaded, and the
venv's own older setuptools would not satisfy torch's metadata, hence `--no-deps`."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, free_port

PROTOCOL_ROWS = ("teacher", "moe", "tcd", "scratch")


def run(argv: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin directory, an environment without the checkout on any path)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO], root,
        env)
    (wheel,) = (root / "dist").glob("tcd_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tcd_ds/presets/protocol_tiny.yaml", "tcd_ds/presets/sweeps/teacher_strength.yaml",
            "tcd_ds/bundled/wiki/train.txt", "tcd_ds/bundled/tasks/movie_reviews/task.yaml"} <= names
    run([sys.executable, "-m", "venv", "--system-site-packages", root / "venv"], root, env)
    bin_dir = root / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "--no-index", "--no-deps", wheel], root, env)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return bin_dir, env


def test_the_installed_package_is_the_wheel(venv, tmp_path):
    bin_dir, env = venv
    proc = run([bin_dir / "python", "-c", "import tcd_ds; print(tcd_ds.__file__)"], tmp_path, env)
    assert Path(proc.stdout.strip()).is_relative_to(bin_dir.parent), proc.stdout  # not the checkout


def test_pretraining_runs_by_module_from_an_empty_directory(venv, tmp_path):
    bin_dir, env = venv
    run([bin_dir / "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", free_port(),
         "--module", "tcd_ds.cli.pretrain", "--spec", "teacher_tiny", "--run_dir=r1", "--train.steps=2"], tmp_path, env)
    assert (tmp_path / "r1" / "checkpoints" / "step_2").is_dir()
    assert (tmp_path / "r1" / "metrics.jsonl").read_text().count('"step"') >= 1


def test_the_tiny_protocol_runs_from_an_empty_directory(venv, tmp_path):
    bin_dir, env = venv
    proc = run([bin_dir / "tcd-ds", "reproduce", "--preset", "tiny", "--out", "p"], tmp_path, env, timeout=900)
    table = (tmp_path / "p" / "results.md").read_text()
    assert all(f"| {row} |" in table for row in PROTOCOL_ROWS), table
    assert (tmp_path / "p" / "results.json").is_file() and "[protocol] finished" in proc.stdout
