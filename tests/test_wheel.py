"""The package as users meet it on a cluster: a wheel built from this checkout, installed non-editable into a fresh
virtual environment (conftest's `installed_wheel`), run from an empty directory. Nothing of the checkout is on the
path: the commands, presets and bundled data all come from the wheel. The one-command protocol runs from the same
wheel in tests/test_protocol.py."""

from pathlib import Path

from conftest import free_port, run_ok


def test_the_installed_package_is_the_wheel(installed_wheel, tmp_path):
    bin_dir, env = installed_wheel
    proc = run_ok([bin_dir / "python", "-c", "import tcd_ds; print(tcd_ds.__file__)"], tmp_path, env)
    assert Path(proc.stdout.strip()).is_relative_to(bin_dir.parent), proc.stdout  # not the checkout


def test_pretraining_runs_by_module_from_an_empty_directory(installed_wheel, tmp_path):
    bin_dir, env = installed_wheel
    run_ok([bin_dir / "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", free_port(),
         "--module", "tcd_ds.cli.pretrain", "--spec", "teacher_tiny", "--run_dir=r1", "--train.steps=2"], tmp_path, env)
    assert (tmp_path / "r1" / "checkpoints" / "step_2").is_dir()
    assert (tmp_path / "r1" / "metrics.jsonl").read_text().count('"step"') >= 1
