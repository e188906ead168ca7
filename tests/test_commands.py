"""The command layer: one spec per command, each setting declared once and settable from the command line and
from a protocol preset; the shared argument convention; the console script; nothing reaching outside the package."""

import subprocess
import sys

import pytest

from conftest import REPO
from tcd_ds.cli import COMMANDS
from tcd_ds.cli import main as tcd_ds
from tcd_ds.cli.common import load_command_spec, parse_command_line, refuse
from tcd_ds.downstream.spec import FinetuneSettings, FinetuneSpec, ProbeSettings, ProbeSpec
from tcd_ds.protocol.plan import stages
from tcd_ds.protocol.preset import Finetuning, Preset, load_preset
from tcd_ds.resources import PRESETS
from tcd_ds.spec import SpecError

# A value other than the default for every fine-tuning and probe setting.
FINETUNE_VALUES = {
    "seeds": [4, 7], "epochs": 2, "batch_size": 8, "eval_batch_size": 16, "lr": [3e-4], "adapter_lr": [2e-3],
    "weight_decay": 0.05, "warmup_ratio": 0.2, "grad_clip": 0.5, "max_length": 48, "adapter_size": 16,
    "balance_weight": 0.0, "max_train_examples": 100, "selection": "dev", "heldout_fraction": 0.2,
    "heldout_max_examples": 50, "eval_capacity_factor": 4.0, "train_router": False, "report_to": ["wandb"],
}
PROBE_VALUES = {"name": "other", "files": ["/some/text.txt"], "seq_len": 32, "batch_size": 4, "cache_dir": "/c"}


def test_every_setting_is_declared_once_and_shared():
    """The command's spec and the preset's section are the same settings (subclasses of one class), with nothing
    re-declared; the test's table covers them all, so a new setting must be added here too."""
    assert set(FINETUNE_VALUES) == set(FinetuneSettings.model_fields)
    assert set(PROBE_VALUES) == set(ProbeSettings.model_fields)
    for settings, command, section in ((FinetuneSettings, FinetuneSpec, Finetuning),
                                       (ProbeSettings, ProbeSpec, ProbeSettings)):
        for name, field in settings.model_fields.items():
            assert repr(command.model_fields[name]) == repr(field) == repr(section.model_fields[name]), name
    assert set(Finetuning.model_fields) - set(FinetuneSettings.model_fields) == {"tasks", "modes", "train_sizes"}
    assert set(FinetuneSpec.model_fields) - set(FinetuneSettings.model_fields) == {"model", "task", "mode", "out"}
    assert Preset.model_fields["probe"].annotation is ProbeSettings


def test_a_preset_setting_reaches_its_job_and_the_command_line_reads_it_back(tmp_path):
    """Every setting, set in the preset, arrives in the fine-tuning / probe jobs' command lines (one fine-tuning
    job per lr and seed), and the command's own parser turns each command line into the same spec."""
    overrides = [f"--finetune.{k}={v}" for k, v in FINETUNE_VALUES.items()]
    overrides += [f"--probe.{k}={v}" for k, v in PROBE_VALUES.items() if k != "files"]
    preset = load_preset(PRESETS / "protocol_tiny.yaml", [*overrides, "--finetune.modes=[full,adapter]"])
    _, plan = stages(preset, tmp_path)
    jobs = {s.name: s for s in plan if s.job}
    finetune = [s for name, s in jobs.items() if name.startswith("finetune tcd movie_reviews_adapter lr 0.002")]
    probe = [s for name, s in jobs.items() if name.startswith("probe tcd")]
    assert [s.name.split()[-1] for s in finetune] == ["4", "7"] and len(probe) == 1
    for stage, spec_class, module, values in (*((s, FinetuneSpec, "tcd_ds.cli.finetune", {
                                                  **FINETUNE_VALUES, "seeds": [int(s.name.split()[-1])]})
                                                for s in finetune),
                                              (probe[0], ProbeSpec, "tcd_ds.cli.probe", PROBE_VALUES)):
        argv = stage.run.argv
        assert argv[:3] == [sys.executable, "-m", module]
        spec = load_command_spec(spec_class, parse_command_line(argv[3:]), "spec")
        expected = {**values, "files": preset.probe.files} if spec_class is ProbeSpec else values
        assert {k: getattr(spec, k) for k in expected} == expected
    assert spec_class is ProbeSpec and spec.model == str(tmp_path / "hf" / "tcd")


@pytest.mark.parametrize("argv, overrides, positionals", [
    (["--lr=1e-3"], ["--lr=1e-3"], []),
    (["--lr", "1e-3", "--seeds", "1", "2"], ["--lr=1e-3", "--seeds=[1, 2]"], []),
    (["dir", "--batch-size", "8", "--train_router"], ["--batch_size=8", "--train_router=True"], ["dir"]),
])
def test_the_shared_argument_convention(argv, overrides, positionals):
    line = parse_command_line(argv, options=("spec",), flags=("dry-run",))
    assert line.overrides == overrides and line.positionals == positionals


def test_a_single_value_where_a_list_is_expected_is_a_list_of_one():
    spec = load_command_spec(FinetuneSpec, parse_command_line(["m", "--task", "t", "--seeds", "5"]), "spec", "model")
    assert spec.seeds == [5] and spec.model == "m"


def test_console_script_lists_and_dispatches_every_command(capsys):
    assert tcd_ds(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    assert tcd_ds(["nosuch"]) == 2 and "unknown command 'nosuch'" in capsys.readouterr().err
    for name in COMMANDS:
        assert tcd_ds([name, "--help"]) == 0, name


@pytest.mark.parametrize("argv, message", [
    (["finetune", "{d}", "--task=movie_reviews"], "model: {d} has no config.json: not a converted model"),
    (["finetune", "{d}/none", "--task=movie_reviews"], "model: {d}/none is not a directory"),
    (["finetune", "{d}/hf", "--task=nosuch"], "nosuch: neither a task directory, a bundled task (movie_reviews)"),
    (["finetune", "{d}/hf", "--task=movie_reviews", "--lr=0"], "lr.0: Input should be greater than 0"),
    (["probe", "{d}/hf", "--files={d}/empty.txt"], "files: {d}/empty.txt: no text: it is empty"),
    (["finetune", "--spec={d}/empty.txt"], "model: Field required"),
])
def test_downstream_commands_refuse_bad_inputs_in_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "empty.txt").write_text("")
    assert tcd_ds([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err and "Traceback" not in err


def test_nothing_reaches_outside_the_package_by_path():
    proc = subprocess.run(["git", "grep", "-n", r"parents\[2\]\|sys.path", "--", "tcd_ds", "tools", "launchers"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout  # 1: no match


@pytest.mark.parametrize("argv, message", [
    (["prepare-data", "--spec=teacher_tiny", "--data.train=/no/such.txt"], "data.train: no such file or directory"),
    (["build-tasks", "{d}", "--out={d}/tasks"], "no movieReviewSnippets_GroundTruth.txt"),
    (["build-corpus", "{d}/none.xml.bz2", "--out={d}/wiki"], "dump {d}/none.xml.bz2 not found"),
    (["sweep", "nosuch", "--trials=1"], "nosuch: no such file, nor a shipped sweep"),
    (["reproduce", "--preset=nosuch"], "nosuch: no such file, nor a shipped preset"),
    (["reproduce", "--teacher.overrides=[--model.hidden_size=65]"], "teacher: model: hidden_size (65) must be"),
    (["pretrain", "--spec=teacher_tiny", "--train.stepz=3"], "train.stepz: unknown key"),
])
def test_every_command_refuses_a_users_mistake_in_one_line_before_work(argv, message, tmp_path, capsys):
    assert tcd_ds([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "tasks").exists() and not (tmp_path / "wiki").exists()


def test_a_refusal_reaches_stderr_in_one_write(monkeypatch):
    """Every rank of a launch refuses alike, onto one shared, unbuffered stderr: written piece by piece (as
    `print` writes the text, then the newline), two ranks' lines ran into each other."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert refuse("invalid run spec x.yaml", SpecError(["model.hidden_size: a", "data.seq_len: b"])) == 2
    assert writes == ["tcd-ds: invalid run spec x.yaml:\n  model.hidden_size: a\n  data.seq_len: b\n"]
