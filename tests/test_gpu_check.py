"""`tools/gpu_check.sh --dry-run` on CPU: every path of the GPU check runs its commands' CPU form (the launcher
validates each launch's spec and overrides, inline checks run, other commands parse their --help), so a renamed
command, option or spec field fails here rather than on the GPU machine."""

import subprocess

from benchmarks.gpu_check import check_paths
from conftest import LAUNCH_ENV, REPO


def test_the_gpu_check_dry_run_passes_every_path(tmp_path):
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=REPO,
                          env={**LAUNCH_ENV, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    names = [p.name for p in check_paths(tmp_path, "cpu")]
    assert [line.split()[1].rstrip(":") for line in lines] == names, proc.stdout + proc.stderr[-2000:]
    assert all(line.startswith("PASS") for line in lines), "\n".join(lines)
    assert proc.returncode == 0
    assert (tmp_path / "gpu_check.md").read_text().count("PASS") == len(names)


def test_the_script_refuses_an_unknown_option():
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--prepare" in proc.stdout
