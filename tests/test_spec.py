"""The run spec: validation messages, overrides and the generated DeepSpeed config, against expectations
written out by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tcd_ds.checks import check_files, check_spec
from tcd_ds.resources import BUNDLED, PRESETS, find_file
from tcd_ds.spec import SpecError, load_spec
from tcd_ds.train.ds_config import deepspeed_config


@pytest.fixture
def text_files(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("some text\n")
    val.write_text("more text\n")
    return str(train), str(val)


@pytest.fixture
def spec_file(tmp_path, text_files):
    def write(**sections):
        body = {"data": {"train": [text_files[0]], "validation": [text_files[1]]}}
        for key, value in sections.items():
            body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(body))
        return str(path)

    return write


def run_launcher(*args):
    return subprocess.run(
        [sys.executable, "-m", "tcd_ds.cli.pretrain", *args], capture_output=True, text=True, cwd=REPO
    )


def problems(path, *overrides) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_spec(path, overrides)
    return err.value.problems


def test_overrides_parse_by_field_type(spec_file):
    spec = load_spec(
        spec_file(),
        ["--optim.lr=3e-4", "--model.num_layers=3", "--logging.wandb.enabled=False", "--optim.betas=[0.8, 0.9]",
         "--logging.progress_bar=0", "--train.steps_per_launch=null", "--model.moe.num_experts=8"],
    )
    assert spec.optim.lr == 3e-4 and isinstance(spec.optim.lr, float)
    assert spec.model.num_layers == 3
    assert spec.logging.wandb.enabled is False
    assert spec.logging.progress_bar is False
    assert spec.optim.betas == (0.8, 0.9)
    assert spec.train.steps_per_launch is None
    assert spec.model.moe is not None and spec.model.moe.num_experts == 8


@pytest.mark.parametrize("text", ["False", "false", "0", "no", "FALSE"])
def test_false_booleans(spec_file, text):
    assert load_spec(spec_file(), [f"--logging.wandb.enabled={text}"]).logging.wandb.enabled is False


@pytest.mark.parametrize(
    "sections, overrides, expected",
    [
        ({"zero_optimisation": {"stage": 2}}, [], "zero_optimisation: unknown key"),
        ({"model": {"hidden_size": 100, "num_heads": 3}}, [], "hidden_size (100) must be divisible by num_heads (3)"),
        ({}, ["--optim.lr=-1"], "optim.lr: Input should be greater than 0 (got '-1')"),
        ({"parallel": {"zero_stage": 3}}, [], "parallel.zero_stage: ZeRO stage 3 is not supported"),
        ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, [], "global_batch_size (10) must be a multiple"),
        ({"model": {"moe": {"num_experts": 6, "ep_size": 4}}}, [], "num_experts (6) must be divisible by ep_size (4)"),
        ({"data": {"seq_len": 1024}}, [], "data.seq_len (1024) exceeds model.max_position (512)"),
        ({}, ["--optim.lrr=1"], "optim.lrr: unknown key"),
    ],
)
def test_invalid_specs_name_the_field(spec_file, sections, overrides, expected):
    found = problems(spec_file(**sections), *overrides)
    assert any(expected in p for p in found), found


def test_invalid_spec_exits_2_without_traceback(spec_file):
    proc = run_launcher("--spec", spec_file(model={"hidden_size": 100, "num_heads": 3}), "--optim.lr=-1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "hidden_size (100) must be divisible by num_heads (3)" in proc.stderr
    assert "optim.lr" in proc.stderr


def test_the_schema_reads_no_file_and_the_file_check_names_each_missing_one(spec_file):
    spec = load_spec(spec_file(), ["--data.train=[/no/such/file.txt]", "--data.validation=[/no/val.txt]"])
    with pytest.raises(SpecError) as err:
        check_files(spec)
    assert err.value.problems == ["data.train: no such file or directory: /no/such/file.txt",
                                  "data.validation: no such file or directory: /no/val.txt"]
    proc = run_launcher("--spec", spec_file(), "--data.train=/no/such/file.txt", "--dry-run")
    assert proc.returncode == 2 and "data.train: no such file or directory: /no/such/file.txt" in proc.stderr


def test_world_size_not_divisible_by_ep_size_is_refused(spec_file):
    spec = load_spec(spec_file(model={"moe": {"num_experts": 4, "ep_size": 2}}, train={"global_batch_size": 24, "micro_batch_size": 8}))
    with pytest.raises(SpecError, match="world size 3 is not divisible by model.moe.ep_size"):
        check_spec(spec, 3)
    proc = run_launcher("--spec", spec_file(model={"moe": {"num_experts": 4, "ep_size": 2}}), "--dry-run", "--world-size=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_deepspeed_config_states_batch_sizes_once(spec_file):
    spec = load_spec(spec_file(train={"global_batch_size": 64, "micro_batch_size": 8}))
    config = deepspeed_config(spec, world_size=2)
    assert config["train_batch_size"] == 64
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4  # 64 / (8 x 2)
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["contiguous_gradients"] and zero["reduce_scatter"]
    with pytest.raises(ValueError, match="not divisible"):
        deepspeed_config(spec, world_size=3)


def test_dry_run_prints_spec_and_config(spec_file):
    proc = run_launcher("--spec", spec_file(), "--dry-run", "--world-size=2", "--train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    spec_text, config_text = proc.stdout.split("# generated DeepSpeed config (world size 2)")
    assert yaml.safe_load(spec_text)["train"]["micro_batch_size"] == 4
    assert json.loads(config_text)["gradient_accumulation_steps"] == 4  # 32 / (4 x 2)


def test_print_schema_is_json_schema():
    proc = run_launcher("--print-schema")
    schema = json.loads(proc.stdout)
    assert schema["additionalProperties"] is False
    assert "zero_stage" in json.dumps(schema)


RUN_PRESETS = sorted(p.name for p in (PRESETS).glob("*.yaml") if not p.name.startswith("protocol_"))


@pytest.mark.parametrize("preset", RUN_PRESETS)
def test_bundled_presets_are_valid(preset, tmp_path, monkeypatch):
    """Every preset validates; teacher runs and tokenizers that a preset expects from an earlier run are
    stood in for by an empty directory (the spec checks only that they exist)."""
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((PRESETS / preset).read_text())
    overrides = []
    if "distill" in raw:
        overrides.append(f"--distill.teacher={tmp_path}")
    if raw.get("data", {}).get("tokenizer", {}).get("path"):
        overrides.append(f"--data.tokenizer.path={tmp_path}")
    spec = load_spec(PRESETS / preset, overrides)
    world_size = spec.model.moe.ep_size * (1 if spec.model.moe.ep_size > 1 else 2) if spec.model.moe else 2
    check_spec(spec, world_size)
    assert deepspeed_config(spec, world_size)["train_batch_size"] == spec.train.global_batch_size


def test_a_bundled_file_is_recorded_by_name_and_read_back_as_this_installations_copy(tmp_path):
    """A run's spec.yaml names bundled data as `bundled:REL`, so a run made from a checkout and the same spec in
    an installed wheel (another absolute path) compare equal; loading it resolves to the file here."""
    spec = load_spec(PRESETS / "teacher_tiny.yaml", [f"--data.validation=[bundled:wiki/validation.txt, {tmp_path}]"])
    assert spec.data.train == [str(BUNDLED / "wiki" / "train.txt")]
    recorded = spec.model_dump(mode="json")["data"]
    assert recorded["train"] == ["bundled:wiki/train.txt"]
    assert recorded["validation"] == ["bundled:wiki/validation.txt", str(tmp_path)]  # other paths as given
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert load_spec(tmp_path / "spec.yaml", []) == spec


def test_a_directory_named_like_a_shipped_file_does_not_hide_it(tmp_path, monkeypatch):
    """`tcd-ds reproduce` (preset `demo`) where a run directory `demo/` sits: the shipped preset, not the folder;
    a file of that name does win, and a directory of any other name is passed on (its command refuses it)."""
    monkeypatch.chdir(tmp_path)
    for name in ("demo", "teacher_tiny", "mine"):
        (tmp_path / name).mkdir()
    assert find_file("demo", "preset") == PRESETS / "protocol_demo.yaml"
    assert find_file("teacher_tiny", "spec") == PRESETS / "teacher_tiny.yaml"
    assert find_file("mine", "spec") == Path("mine")
    (tmp_path / "demo").rmdir()
    (tmp_path / "demo").write_text("out_dir: x\n")
    assert find_file("demo", "preset") == Path("demo")
