"""A new user's mistakes in the spec and in their own files: refused with a message naming the field or file,
a non-zero exit and no traceback, before any process group starts where the spec and files allow it."""

import subprocess
import sys

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import BertConfig, PreTrainedTokenizerFast

from conftest import LAUNCH_ENV, REPO, STUDENT_TCD, TEACHER, fast, launch_command
from tcd_ds.cli import pretrain
from tcd_ds.data.text import CorpusError
from tcd_ds.data.tokenizer import build_tokenizer



@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the presets' data paths are relative to the repository


@pytest.fixture
def files(tmp_path):
    """Bad and good inputs, by name."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x80abc\n\xc3\x28\n")
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "no_txt" / "notes.md").write_text("text, but not a .txt file\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "spec_dir").mkdir()
    (tmp_path / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    (tmp_path / "small.txt").write_text("hello world\nsome more text\n")
    return tmp_path


def hf_teacher(path, layers: int):
    """An HF teacher directory (config and tokenizer only: the checks read no weights)."""
    BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
               intermediate_size=256, max_position_embeddings=64).save_pretrained(path)
    words = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    return path


def refused(capsys, *argv) -> str:
    """Run the launcher's checks in this process (what each rank and --dry-run run first): exit 2, the message."""
    status = pretrain.main(["--dry-run", "--world-size=2", *map(str, argv)])
    err = capsys.readouterr().err
    assert status == 2, err
    return err


CASES = {
    "spec is a directory": (["--spec", "{d}/spec_dir"], "spec file {d}/spec_dir is a directory"),
    "spec not UTF-8": (["--spec", "{d}/latin1.yaml"], "is not UTF-8 text"),
    "train corpus empty": (["--data.train=[{d}/empty.txt]"], "data.train: {d}/empty.txt: no text: it is empty"),
    "train corpus blank lines": (["--data.train=[{d}/blank.txt]"], "data.train: {d}/blank.txt: no text"),
    "train corpus undecodable": (["--data.train=[{d}/binary.txt]"], "all 2 of its non-empty lines are not UTF-8"),
    "train dir without .txt": (["--data.train=[{d}/no_txt]"], "data.train: no .txt files under {d}/no_txt"),
    "validation corpus empty": (["--data.validation=[{d}/empty.txt]"], "data.validation: {d}/empty.txt: no text"),
    "tokenizer dir empty": (["--data.tokenizer.path={d}/empty_dir"], "{d}/empty_dir holds no tokenizer files"),
    "infinite lr": (["--optim.lr=inf"], "optim.lr: Input should be a finite number"),
    "nan beta": (["--optim.betas=[0.9, .nan]"], "optim.betas.1: Input should be a finite number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_naming_it(case, files, capsys):
    args, expected = CASES[case]
    args = [a.format(d=files) for a in args]
    spec = [] if args[0] == "--spec" else ["--spec", TEACHER]
    assert expected.format(d=files) in refused(capsys, *spec, *args)


def test_tcd_spec_that_cannot_distil_as_asked_is_refused(files, capsys):
    teacher = hf_teacher(files / "teacher", layers=3)
    spec = ["--spec", STUDENT_TCD, f"--distill.teacher={teacher}"]
    err = refused(capsys, *spec, "--distill.trunk.weight=inf")
    assert "distill.trunk.weight: Input should be a finite number" in err
    off = [f"--distill.{loc}.enabled=False" for loc in ("trunk", "residual_inner", "attention")]
    err = refused(capsys, *spec, *off)
    assert "distill: every relation location (trunk, residual_inner, attention) is disabled" in err
    # The teacher has 3 layers, the student 2: layer i must be layer i of both.
    assert "num_hidden_layers: teacher has 3, student has 2" in refused(capsys, *spec)


def test_refusal_prints_no_traceback(files):
    launcher = str(REPO / "launchers" / "pretrain.py")  # the checkout's entry point
    proc = subprocess.run([sys.executable, launcher, "--spec", str(files / "spec_dir")], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "is a directory" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_degenerate_corpus_in_the_data_path_is_a_corpus_error(files):
    """What the pre-launch check cannot see (it reads up to the first line) fails in the data path with the
    file named, not with SentencePiece's internal messages."""
    with pytest.raises(CorpusError, match="small.txt: too little text for a vocabulary of 100 pieces"):
        build_tokenizer([str(files / "small.txt")], 100, str(files / "cache"))
    with pytest.raises(CorpusError, match="binary.txt: no text: all 2"):
        build_tokenizer([str(files / "binary.txt")], 100, str(files / "cache"))


def test_corpus_error_inside_a_launch_ends_every_rank_with_the_message(files, tmp_path):
    """Found on local rank 0 while it builds the tokenizer, with rank 1 waiting: both report it, exit 2."""
    cmd = launch_command(TEACHER, *fast(tmp_path / "run", files / "cache"), f"--data.train=[{files / 'small.txt'}]",
                         "--data.tokenizer.vocab_size=100")
    proc = subprocess.run(cmd, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "too little text for a vocabulary of 100 pieces" in output
    assert "Traceback" not in output
