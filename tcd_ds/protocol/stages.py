"""Stages that run once: each has a key (everything its result depends on, its inputs' keys included), and a
marker file records the key it last ran with and whether it finished.

A finished stage with the same key is skipped; an unfinished one runs again (a pre-training run resumes from its
last checkpoint); one whose key changed has its outputs removed first, and since keys include their inputs' keys,
everything downstream of a change runs again too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class StageFailed(RuntimeError):
    """A stage's command failed; the message names the stage and its log, and ends with the log's last lines."""


@dataclass
class Stage:
    name: str  # e.g. "pretrain tcd"; also names its marker and log file
    key: dict
    run: Callable[[Path], None]  # given the stage's log file
    outputs: list[Path] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("/", "_")


def command(argv: list[str], env: dict[str, str] | None = None) -> Callable[[Path], None]:
    """A stage body that runs `argv` with its output in the stage's log."""

    def run(log: Path) -> None:
        with log.open("w") as f:
            f.write(" ".join(argv) + "\n")
            f.flush()
            code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise StageFailed(f"exit status {code}; log: {log}; its last lines:\n{tail}")

    return run


def in_process(body: Callable[[], None]) -> Callable[[Path], None]:
    """A stage body that runs `body` in this process with its printed output and progress bars in the stage's
    log (and transformers' warnings, such as a new classifier head's, only there as well)."""

    def run(log: Path) -> None:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                try:
                    body()
                except Exception as e:
                    traceback.print_exc()
                    raise StageFailed(f"{type(e).__name__}: {e}; log: {log}") from e
        finally:
            hf_logging.set_verbosity(verbosity)

    return run


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def run_stages(stages: list[Stage], out_dir: Path, log: Callable[[str], None] = print) -> dict[str, float]:
    """Run what is not done yet, one progress line per stage; returns each stage's run time (0 when skipped)."""
    markers, logs = out_dir / "stages", out_dir / "logs"
    markers.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    times = {}
    for i, stage in enumerate(stages, 1):
        marker = markers / f"{stage.slug}.json"
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        prefix = f"[protocol {i}/{len(stages)}] {stage.name}"
        if previous and previous["key"] == stage.key and previous["done"]:
            log(f"{prefix}: done in an earlier run, skipped")
            times[stage.name] = 0.0
            continue
        if previous and previous["key"] != stage.key:
            log(f"{prefix}: its settings or inputs changed since it last ran; starting it over")
            for path in stage.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        marker.write_text(json.dumps({"key": stage.key, "done": False}, indent=1))
        log_file = logs / f"{stage.slug}.log"
        log(f"{prefix}: running (log: {log_file})")
        start = time.perf_counter()
        try:
            stage.run(log_file)
        except StageFailed as e:
            raise StageFailed(f"{stage.name} failed: {e}") from None
        times[stage.name] = time.perf_counter() - start
        marker.write_text(json.dumps({"key": stage.key, "done": True, "seconds": times[stage.name]}, indent=1))
        log(f"{prefix}: done in {minutes(times[stage.name])}")
    return times
