"""Everything a command checks before it starts work, in one place, so that a mistake is refused with exit 2
and one line per problem before any process group starts (a launch that would fail in its first minute, or
on every rank with a traceback, costs a cluster queue slot):

- `check_spec`: pure, the spec and the world size (what the schema cannot know alone);
- `check_files`: the file system, explicitly: the data, the tokenizer, the teacher;
- `check_converted_model`, `check_text_files`: the inputs of the downstream commands;
- `warn_on_stale_build_locks`: the environment, for what would otherwise look like a silent hang.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tcd_ds.spec import RunSpec, SpecError, grad_accum_steps

STALE_AFTER_MINUTES = 10


def check_spec(spec: RunSpec, world_size: int) -> None:
    """A SpecError with one line per problem that needs the world size."""
    problems = []
    try:
        grad_accum_steps(spec.train.global_batch_size, spec.train.micro_batch_size, world_size)
    except ValueError as e:
        problems.append(str(e))
    moe = spec.model.moe
    if moe is not None and world_size % moe.ep_size:
        problems.append(f"world size {world_size} is not divisible by model.moe.ep_size ({moe.ep_size}): "
                        "expert-parallel groups must tile the ranks")
    distill = spec.distill
    if distill is not None and distill.scope == "global" and distill.num_positions % world_size:
        problems.append(f"distill.num_positions ({distill.num_positions}) must be divisible by the world size "
                        f"({world_size}) with distill.scope: global (each rank samples num_positions / world size)")
    if problems:
        raise SpecError(problems)


def check_files(spec: RunSpec) -> None:
    """A SpecError with one line per unusable file of the user's: a corpus with no file or no text line, a
    tokenizer folder with no tokenizer, a teacher that is missing, incomplete or does not fit the student.
    Reads each corpus up to its first text line and no weights, so it is cheap on any real corpus and teacher."""
    data = spec.data
    problems = []
    corpora = {"data.validation": data.validation} if data.hub else {"data.train": data.train,
                                                                      "data.validation": data.validation}
    for field, paths in corpora.items():
        try:
            check_text_files(paths, field)
        except SpecError as e:
            problems += e.problems
    if data.tokenizer.path:
        from tcd_ds.data.tokenizer import load_tokenizer

        try:
            load_tokenizer(data.tokenizer.path)
        except (OSError, ValueError) as e:
            problems.append(f"data.tokenizer.path: {e}")
    if spec.distill is not None:
        if not Path(spec.distill.teacher).exists():
            problems.append(f"distill.teacher: {spec.distill.teacher} not found (relative to {os.getcwd()})")
        elif not problems:  # the teacher is compared with the student's tokenizer, if that is usable
            from tcd_ds.distill.teacher import check_teacher_fits_spec

            try:
                check_teacher_fits_spec(spec)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise SpecError(problems)


CONVERTED_MODEL_TYPES = ("bert", "moe_bert")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_converted_model(path: str | Path, field: str) -> None:
    """A SpecError naming `field` unless `path` is a Hugging Face directory as `tcd-ds convert` writes it: a
    readable config.json of a BERT or MoE-BERT model, its weights and its tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise SpecError([f"{field}: {path} is not a directory (a model converted by `tcd-ds convert`)"])
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([f"{field}: {path} has no config.json: not a converted model (`tcd-ds convert`)"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError([f"{field}: {path / 'config.json'} cannot be read: {e}"]) from None
    problems = []
    if not isinstance(config, dict) or config.get("model_type") not in CONVERTED_MODEL_TYPES:
        kind = config.get("model_type") if isinstance(config, dict) else None
        problems.append(f"{field}: {path} holds a model of type {kind!r}, not one of {CONVERTED_MODEL_TYPES}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"{field}: {path} has no weights ({' or '.join(WEIGHT_FILES)})")
    if not (path / "tokenizer_config.json").is_file():
        problems.append(f"{field}: {path} has no tokenizer (tokenizer_config.json)")
    if problems:
        raise SpecError(problems)


def check_text_files(paths: list[str], field: str) -> None:
    """A SpecError naming `field` unless every path is a readable file with a text line."""
    from tcd_ds.data.text import CorpusError, check_corpus

    try:
        check_corpus(field, paths)
    except CorpusError as e:
        raise SpecError([str(e)]) from None


def stale_build_locks(max_age_minutes: float = STALE_AFTER_MINUTES) -> list[tuple[Path, float]]:
    """Torch extension build locks older than `max_age_minutes`, with their age in minutes.

    DeepSpeed JIT-builds ops (on CPU: its shared-memory communication op, at the first launch) behind torch's file
    lock; a launch killed during that build leaves the lock behind, and every later launch waits on it forever."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    stale = []
    for lock in root.glob("*/*/lock"):
        try:
            age = (time.time() - lock.stat().st_mtime) / 60
        except FileNotFoundError:  # the build that held it just finished
            continue
        if age > max_age_minutes:
            stale.append((lock, age))
    return stale


def warn_on_stale_build_locks() -> None:
    for lock, age in stale_build_locks():
        print(f"[tcd-ds] warning: {lock} is {age:.0f} minutes old. A launch killed while building that op leaves it "
              "behind, and this launch will wait on it forever; if no other launch is building it, delete the "
              "file.", file=sys.stderr)
