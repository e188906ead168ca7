"""W&B: a 2-rank offline run writes exactly one W&B run mirroring metrics.jsonl, with the resolved spec as config
and no API key anywhere; what `wandb agent` hands a trial (its ${args}, its parameter file) changes the spec."""

import json
import struct
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from wandb.proto import wandb_internal_pb2
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
from wandb.sdk.lib.config_util import save_config_file_from_dict

from conftest import LAUNCH_ENV, REPO, launch_command
from tcd_ds.cli import pretrain
from tcd_ds.resources import PRESETS
from tcd_ds.spec import load_spec
from tcd_ds.train.metrics import read_metrics
from tcd_ds.train.wandb_run import agent_overrides

TEACHER = PRESETS / "teacher_tiny.yaml"
SECRET = "tcdtest" + "0123456789abcdef" * 2 + "4242"  # an API key's shape (40 characters)


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a .wandb file, read as W&B's format is laid out: a 7-byte header (":W&B", key, version),
    then a LevelDB log of 32 KiB blocks whose chunks are crc32 (4), length (2), type (1: full, 2: first,
    3: middle, 4: last) and data; a block's last < 7 bytes are padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, parts = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def launch_with_env(env: dict[str, str], spec: Path, *overrides: str) -> subprocess.CompletedProcess:
    """conftest's launch, with W&B's environment variables added."""
    proc = subprocess.run(launch_command(spec, *overrides), cwd=REPO, env={**LAUNCH_ENV, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def history_rows(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("wandb")
    run_dir, wandb_dir = tmp / "run", tmp / "wandb_dir"
    wandb_dir.mkdir()
    proc = launch_with_env(
        {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_API_KEY": SECRET},
        TEACHER, f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", "--train.steps=4", "--logging.every=2",
        "--train.eval_every=4", "--checkpoint.every=2", "--logging.progress_bar=False",
        "--logging.wandb.enabled=True", "--logging.wandb.tags=[tiny, test]", "--logging.wandb.group=g1",
    )
    return run_dir, wandb_dir, proc


def test_one_offline_run_mirrors_metrics_and_spec(wandb_run):
    run_dir, wandb_dir, _ = wandb_run
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 1 created none
    (wandb_file,) = runs[0].glob("*.wandb")
    records = read_wandb_records(wandb_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].name.endswith(run.run_id)
    assert list(run.tags) == ["tiny", "test"] and run.run_group == "g1"

    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    resolved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert {k: config[k] for k in resolved} == resolved
    assert config["train"]["steps"] == 4 and config["logging"]["wandb"]["enabled"] is True

    logged = {row.pop("_step"): {k: v for k, v in row.items() if not k.startswith("_")} for row in history_rows(records)}
    expected = {r.pop("step"): r for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(logged) == sorted(expected) == [2, 4]
    for step, record in expected.items():
        assert logged[step] == pytest.approx(record)

    # the checkpoint carries the W&B run id, so a relaunch continues this run (tests/test_stop.py relaunches)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["wandb_run_id"] == run.run_id


def test_api_key_is_written_nowhere(wandb_run):
    run_dir, wandb_dir, proc = wandb_run
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for d in (run_dir, wandb_dir) for p in d.rglob("*") if p.is_file()]
    assert files and not [p for p in files if SECRET.encode() in p.read_bytes()]


AGENT_PARAMS = {
    "model.moe.capacity_factor": {"value": 2.0},
    "model.moe.drop_tokens": {"value": False},
    "model.moe.noisy_gate_policy": {"value": "RSample"},
    "optim.lr": {"value": 3e-05},
    "logging.wandb.tags": {"value": ["sweep", "moe"]},
}
STUDENT_MOE = str(PRESETS / "student_tiny_moe.yaml")


def agent_args(params: dict) -> list[str]:
    """What `wandb agent` puts in ${args}, by its own code."""
    return create_sweep_command_args({"args": params})["args"]


@pytest.fixture
def agent_param_file(tmp_path, monkeypatch) -> Path:
    """The parameter file exactly as `wandb agent` writes it (its own function), and the env it sets."""
    path = tmp_path / "wandb" / "sweep-abc" / "config-run1.yaml"
    save_config_file_from_dict(str(path), AGENT_PARAMS)
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(path))
    return path


def test_param_file_reads_as_the_agents_args(agent_param_file):
    assert agent_overrides({"WANDB_SWEEP_PARAM_PATH": str(agent_param_file)}) == agent_args(AGENT_PARAMS)
    assert agent_overrides({}) == []


def resolved_by_launcher(argv: list[str], capsys) -> dict:
    assert pretrain.main([*argv, "--dry-run", "--world-size=2"]) == 0
    text = capsys.readouterr().out
    return yaml.safe_load(text.split("# resolved run spec")[1].split("# generated DeepSpeed config")[0])


def test_launcher_applies_param_file_and_agent_args(agent_param_file, capsys, monkeypatch):
    default = load_spec(STUDENT_MOE)
    assert (default.model.moe.capacity_factor, default.model.moe.drop_tokens, default.optim.lr) == (1.25, True, 1e-3)

    # the param file alone (a sweep command without ${args})
    spec = resolved_by_launcher(["--spec", STUDENT_MOE], capsys)
    assert spec["model"]["moe"]["capacity_factor"] == 2.0
    assert spec["model"]["moe"]["drop_tokens"] is False
    assert spec["model"]["moe"]["noisy_gate_policy"] == "RSample"
    assert spec["optim"]["lr"] == 3e-05
    assert spec["logging"]["wandb"]["tags"] == ["sweep", "moe"]

    # the agent's usual command: the same values again in ${args}, and an explicit override that wins
    spec = resolved_by_launcher(["--spec", STUDENT_MOE, *agent_args(AGENT_PARAMS), "--optim.lr=0.01"], capsys)
    assert spec["optim"]["lr"] == 0.01
    assert spec["model"]["moe"]["drop_tokens"] is False

    # ${args} alone do the same as the file
    monkeypatch.delenv("WANDB_SWEEP_PARAM_PATH")
    spec = resolved_by_launcher(["--spec", STUDENT_MOE, *agent_args(AGENT_PARAMS)], capsys)
    assert spec["model"]["moe"]["drop_tokens"] is False and spec["optim"]["lr"] == 3e-05


def test_agent_args_set_relation_weights_and_switch_attention_off(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    tcd = PRESETS / "student_tiny_tcd.yaml"
    args = agent_args({"distill.trunk.weight": {"value": 0.5}, "distill.attention.enabled": {"value": False}})
    assert args == ["--distill.trunk.weight=0.5", "--distill.attention.enabled=False"]
    before = load_spec(tcd, [f"--distill.teacher={teacher}"]).distill
    after = load_spec(tcd, [f"--distill.teacher={teacher}", *args]).distill
    assert (before.trunk.weight, before.attention.enabled) == (1.0, True)
    assert (after.trunk.weight, after.attention.enabled) == (0.5, False)


@pytest.mark.parametrize("text", ["False", "false", "0"])
def test_false_in_any_spelling_turns_a_switch_off(capsys, text):
    spec = resolved_by_launcher(["--spec", STUDENT_MOE, f"--model.moe.drop_tokens={text}"], capsys)
    assert spec["model"]["moe"]["drop_tokens"] is False


def test_each_agent_trial_gets_its_own_run_dir(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    spec = resolved_by_launcher(["--spec", STUDENT_MOE, "--run_dir=runs/sweep"], capsys)
    assert spec["run_dir"] == "runs/sweep/run7"


def test_unreadable_param_file_is_a_spec_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(tmp_path / "missing.yaml"))
    assert pretrain.main(["--spec", STUDENT_MOE, "--dry-run"]) == 2
    assert "WANDB_SWEEP_PARAM_PATH" in capsys.readouterr().err
