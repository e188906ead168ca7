"""`tcd-ds convert` (and tools/convert_to_hf.py from the checkout) on runs made by the real launcher: round trips against the DeepSpeed engine's eval
logits, loading without DeepSpeed (and without our package), fp32 masters of a bf16 run, and the errors."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForMaskedLM

from conftest import REPO, free_port, launch
from tcd_ds.cli.convert import main as convert_main
from tcd_ds.hf.convert import convert, write_atomically
from tcd_ds.models.modeling_moe_bert import MoEBertForMaskedLM
from tcd_ds.resources import PRESETS
from tcd_ds.rundir import Checkpoint, CheckpointError, locate_checkpoint

STUDENT = PRESETS / "student_tiny_moe.yaml"
# Eval capacity factor = num_experts: capacity = every token of a micro-batch, so no expert can overflow and
# DeepSpeed's random choice of dropped tokens cannot enter the round trip (test_convert_routing.py covers drops).
NO_DROPS = "--model.moe.eval_capacity_factor=4.0"
RUNS = {  # the students; the teacher is the session's (conftest.py)
    "student_ep2": (STUDENT, NO_DROPS),  # 2 ranks, 2 experts per rank
    "student_ep1": (STUDENT, NO_DROPS, "--model.moe.ep_size=1"),  # every expert on both ranks, ZeRO-split
    "student_e64": (STUDENT, "--model.moe.num_experts=64", "--model.moe.eval_capacity_factor=64.0"),  # 32 per rank
}
EXPERT_KEY = "bert.encoder.layer.{layer}.output.dense.deepspeed_moe.experts.deepspeed_experts.{expert}.dense_in.weight"


def tiny_run(spec: Path, run_dir: Path, cache_dir: Path, *overrides: str) -> Path:
    launch(spec, f"--run_dir={run_dir}", "--train.steps=4", "--checkpoint.every=4", "--logging.progress_bar=False",
           f"--data.cache_dir={cache_dir}", *overrides)
    return run_dir


@pytest.fixture(scope="session")
def runs(tmp_path_factory, cache_dir, teacher_run) -> dict[str, Path]:
    """The students of RUNS, and the session's teacher (12 steps; checkpoints step_8 and step_12 kept)."""
    root = tmp_path_factory.mktemp("runs")
    students = {name: tiny_run(spec, root / name, cache_dir, *extra) for name, (spec, *extra) in RUNS.items()}
    return {**students, "teacher": teacher_run}


@pytest.fixture(scope="session")
def engine_logits(runs, tmp_path_factory) -> dict[str, list[dict]]:
    """Per run, per rank: the fixed batch and the DeepSpeed engine's eval logits (tests/ds_eval_logits.py)."""
    prefix = tmp_path_factory.mktemp("engine") / "logits"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "ds_eval_logits.py"), str(prefix), *(str(p) for p in runs.values())]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    by_rank = [torch.load(f"{prefix}.rank{r}.pt", weights_only=True) for r in range(2)]
    return {name: [results[str(path)] for results in by_rank] for name, path in runs.items()}


@pytest.fixture(scope="session")
def converted(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run converted: the teacher by the command line, as a user runs it; the students in-process."""
    root = tmp_path_factory.mktemp("hf")
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", str(runs["teacher"]), str(root / "teacher")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"wrote {root / 'teacher'}" in proc.stdout, proc.stderr[-4000:]
    return {"teacher": root / "teacher", **{n: convert(runs[n], root / n) for n in RUNS}}


def cli(*args: str) -> int:
    """`tcd-ds convert`'s main(), in this process."""
    return convert_main([str(a) for a in args])


def eval_logits(model, result: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=result["input_ids"], attention_mask=result["attention_mask"]).logits


@pytest.mark.parametrize("name", [*RUNS, "teacher"])
def test_converted_logits_equal_the_deepspeed_engines(name, converted, engine_logits):
    model_class = BertForMaskedLM if name == "teacher" else MoEBertForMaskedLM
    model = model_class.from_pretrained(converted[name]).eval()
    assert type(model) is model_class
    for result in engine_logits[name]:  # each rank's own batch, with padding
        assert result["attention_mask"].eq(0).any()
        torch.testing.assert_close(eval_logits(model, result), result["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, mode",
    [("student_ep2", "package"), ("student_ep1", "remote_code"), ("student_e64", "remote_code"), ("teacher", "plain")],
)
def test_loads_in_a_process_without_deepspeed(name, mode, converted, engine_logits, tmp_path):
    """package: `register_auto_classes()` + AutoModelForMaskedLM; remote_code: neither deepspeed nor tcd_ds importable,
    the shipped modeling file; plain (teacher): neither importable, no remote code."""
    result = engine_logits[name][0]
    torch.save({"input_ids": result["input_ids"], "attention_mask": result["attention_mask"]}, tmp_path / "batch.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "load_without_deepspeed.py"), str(converted[name]),
         str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), mode],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(out["logits"], result["logits"], rtol=0, atol=1e-5)
    assert not any(m.split(".")[0] == "deepspeed" for m in out["loaded"])
    assert out["encoder_difference"] < 1e-5  # the classifier's encoder is the converted one; only its head is new
    if mode == "package":
        assert (out["class"], out["module"]) == ("MoEBertForMaskedLM", "tcd_ds.models.modeling_moe_bert")
        assert (out["classifier_class"], out["classifier_module"]) == (
            "MoEBertForSequenceClassification", "tcd_ds.models.modeling_moe_bert")
        assert out["loaded"] == ["tcd_ds", "tcd_ds.models", "tcd_ds.models.modeling_moe_bert"]
    elif mode == "remote_code":
        assert out["class"] == "MoEBertForMaskedLM" and out["module"].startswith("transformers_modules.")
        assert out["classifier_class"] == "MoEBertForSequenceClassification"
        assert out["classifier_module"] == out["module"]
        assert out["loaded"] == []
    else:
        assert (out["class"], out["module"]) == ("BertForMaskedLM", "transformers.models.bert.modeling_bert")
        assert out["classifier_class"] == "BertForSequenceClassification"
        assert out["loaded"] == []
    if mode != "plain":
        assert math.isfinite(out["balance_loss"]) and out["balance_loss"] > 0


def test_teacher_directory_is_plain_bert_with_the_runs_tokenizer(converted, runs):
    out = converted["teacher"]
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    assert "auto_map" not in config
    ours, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(runs["teacher"] / "tokenizer")
    assert ours.get_vocab() == original.get_vocab() and len(ours) == config["vocab_size"]
    text = "The river flows north through the valley."
    assert ours(text)["input_ids"] == original(text)["input_ids"]


def test_student_directory_holds_every_expert_by_global_id_and_its_modeling_code(converted, runs):
    out, ckpt = converted["student_ep2"], runs["student_ep2"] / "checkpoints" / "step_4"
    assert (out / "modeling_moe_bert.py").read_bytes() == (REPO / "tcd_ds" / "models" / "modeling_moe_bert.py").read_bytes()
    config = json.loads((out / "config.json").read_text())
    moe_fields = ("model_type", "ep_size", "moe_layers", "num_experts")
    assert [config[f] for f in moe_fields] == ["moe_bert", 1, [0, 1], 4]
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_moe_bert.MoEBertForMaskedLM"
    weights = load_file(out / "model.safetensors")
    for layer in (0, 1):
        for expert in range(4):  # experts 2 and 3 were rank 1's local experts 0 and 1
            saved = torch.load(ckpt / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt", weights_only=True)
            key = EXPERT_KEY.format(layer=layer, expert=expert)
            assert torch.equal(weights[key], saved[key])
    assert len({EXPERT_KEY.format(layer=0, expert=e) for e in range(4)} & weights.keys()) == 4


def test_model_card_names_run_step_and_spec(converted, runs):
    card = (converted["student_ep2"] / "README.md").read_text()
    logged = [json.loads(line) for line in (runs["student_ep2"] / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r for r in logged if r["step"] == 4][-1]["val/loss/mlm"]
    for expected in (str(runs["student_ep2"]), "`step_4` (step 4 of 4)", "hidden size 64", "2 layers",
                     "4 top-1 experts", "trained with ep_size 2", "fp32", f"val/loss/mlm: {val_loss:.4g}",
                     "trust_remote_code=True", "register_auto_classes()"):
        assert expected in card, expected
    assert "dense BERT" in (converted["teacher"] / "README.md").read_text()


def test_tag_picks_the_checkpoint_from_any_input_form(runs, tmp_path):
    run = runs["teacher"]
    latest = Checkpoint(run, "step_12")
    assert locate_checkpoint(run, None) == locate_checkpoint(run / "checkpoints", None) == latest
    assert locate_checkpoint(run / "checkpoints" / "step_12", None) == latest
    assert locate_checkpoint(run / "checkpoints", "step_8") == Checkpoint(run, "step_8")
    with pytest.raises(CheckpointError, match="disagrees"):
        locate_checkpoint(run / "checkpoints" / "step_12", "step_8")

    convert(run / "checkpoints", tmp_path / "step_8", tag="step_8")
    weights = load_file(tmp_path / "step_8" / "model.safetensors")
    for tag, same in (("step_8", True), ("step_12", False)):
        module = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        key = "bert.encoder.layer.1.output.dense.weight"
        assert torch.equal(weights[key], module[key]) == same
    assert "`step_8` (step 8 of 12)" in (tmp_path / "step_8" / "README.md").read_text()


def test_bf16_run_converts_to_its_fp32_master_weights(tmp_path_factory, cache_dir):
    """DeepSpeed keeps fp32 masters in the ZeRO shards and writes the bf16 module and expert weights rounded from
    them: so each converted tensor is fp32, rounds to exactly the saved bf16 tensor, and is not that tensor."""
    root = tmp_path_factory.mktemp("bf16")
    run = tiny_run(STUDENT, root / "run", cache_dir, "--train.dtype=bf16")  # 2 ranks, ep_size 2
    out = convert(run, root / "hf")
    ckpt = run / "checkpoints" / "step_4"
    saved = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"])
    for file in ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        saved.update(torch.load(file, weights_only=True))
    weights = load_file(out / "model.safetensors")
    assert len(weights) == len(saved) - 2  # the tied MLM decoder weight and bias are stored once
    for name, value in weights.items():
        assert value.dtype == torch.float32 and saved[name].dtype == torch.bfloat16
        assert torch.equal(value.to(torch.bfloat16), saved[name]), name
        assert not torch.equal(value, saved[name].float()), name
    assert "fp32 master weights from the ZeRO shards (bf16 run)" in (out / "README.md").read_text()


def damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize("damage", ["missing expert file", "truncated expert file", "truncated model states"])
def test_a_damaged_checkpoint_fails_naming_the_file_and_writes_nothing(damage, runs, tmp_path, capsys):
    run = damaged_copy(runs["student_ep2"], tmp_path)
    ckpt = run / "checkpoints" / "step_4"
    broken = ckpt / ("mp_rank_00_model_states.pt" if damage == "truncated model states"
                     else "layer_1_expert_3_mp_rank_00_model_states.pt")
    if damage == "missing expert file":
        broken.unlink()
    else:
        data = broken.read_bytes()
        broken.write_bytes(data[: len(data) // 2])
    assert cli(run, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(broken) in err and err.count("\n") == 1
    assert ("missing" if damage == "missing expert file" else "truncated") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no partial directory


def test_unknown_tag_fails_naming_it_and_the_saved_tags(runs, tmp_path, capsys):
    assert cli(runs["teacher"], tmp_path / "out", "--tag", "step_9") == 2
    err = capsys.readouterr().err
    assert "step_9" in err and "['step_8', 'step_12']" in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_force_then_is_replaced_whole(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(runs["teacher"], out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert cli(runs["teacher"], out, "--force") == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json", "README.md"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_previous_output_untouched_and_no_partial_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fail_halfway(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(out, fail_halfway)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "fresh", fail_halfway)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_exits_1_in_one_line_and_leaves_nothing(runs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert cli(runs["teacher"], blocker / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {blocker / 'out'}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]
