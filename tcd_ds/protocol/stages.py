"""Stages that run once: each has a key (everything its result depends on, its inputs' keys included), and a
marker file records the key it last ran with and whether it finished.

A finished stage with the same key is skipped; an unfinished one runs again (a pre-training run resumes from its
last checkpoint); one whose key changed has its outputs removed first, and since keys include their inputs' keys,
everything downstream of a change runs again too.

Job stages (fine-tunings, probes: each a process of its own) that follow one another run side by side, one per
device slot (tcd_ds.protocol.slots); each has its own log and marker, as a serial stage does.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tcd_ds.protocol.slots import Slot


class StageFailed(RuntimeError):
    """A stage's command failed; the message names the stage and its log, and ends with the log's last lines."""


@dataclass
class Stage:
    name: str  # e.g. "pretrain tcd"; also names its marker and log file
    key: dict
    run: Callable[..., None]  # given the stage's log file (and a job, its slot)
    outputs: list[Path] = field(default_factory=list)
    job: bool = False  # a process that may run beside other jobs, in a device slot

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("/", "_")


def command(argv: list[str], env: dict[str, str] | None = None) -> Callable[..., None]:
    """A stage body that runs `argv` with its output in the stage's log; in a slot, pinned to its cores with its
    devices and thread counts."""

    def run(log: Path, slot: Slot | None = None) -> None:
        args, environ = argv, env
        if slot is not None:
            args, environ = slot.wrap(argv), {**(os.environ if env is None else env), **slot.env()}
        with log.open("w") as f:
            f.write(" ".join(args) + "\n")
            f.flush()
            code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=environ).returncode
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise StageFailed(f"exit status {code}; log: {log}; its last lines:\n{tail}")

    run.argv = argv  # what the stage runs, for the eye (and the tests)
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


class Runner:
    """Runs stages with markers in `out_dir/stages` and logs in `out_dir/logs`, one progress line per stage."""

    def __init__(self, stages: list[Stage], out_dir: Path, log: Callable[[str], None]):
        self.stages, self.log = stages, log
        self.markers, self.logs = out_dir / "stages", out_dir / "logs"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}

    def prefix(self, stage: Stage) -> str:
        return f"[protocol {self.stages.index(stage) + 1}/{len(self.stages)}] {stage.name}"

    def marker(self, stage: Stage) -> Path:
        return self.markers / f"{stage.slug}.json"

    def pending(self, stage: Stage) -> bool:
        """False for a stage done with the same key (skipped); else clean up after a changed key and mark it
        started."""
        marker = self.marker(stage)
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        if previous and previous["key"] == stage.key and previous["done"]:
            self.log(f"{self.prefix(stage)}: done in an earlier run, skipped")
            self.times[stage.name] = 0.0
            return False
        if previous and previous["key"] != stage.key:
            self.log(f"{self.prefix(stage)}: its settings or inputs changed since it last ran; starting it over")
            for path in stage.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        marker.write_text(json.dumps({"key": stage.key, "done": False}, indent=1))
        return True

    def run(self, stage: Stage, slot: Slot | None = None) -> None:
        log_file = self.logs / f"{stage.slug}.log"
        where = "" if slot is None else f" on {slot.describe()}"
        self.log(f"{self.prefix(stage)}: running{where} (log: {log_file})")
        start = time.perf_counter()
        try:
            stage.run(log_file) if slot is None else stage.run(log_file, slot)
        except StageFailed as e:
            raise StageFailed(f"{stage.name} failed: {e}") from None
        self.times[stage.name] = time.perf_counter() - start
        self.marker(stage).write_text(json.dumps(
            {"key": stage.key, "done": True, "seconds": self.times[stage.name]}, indent=1))
        self.log(f"{self.prefix(stage)}: done in {minutes(self.times[stage.name])}")

    def run_jobs(self, jobs: list[Stage], slots: list[Slot]) -> None:
        """Each pending job in the first free slot; after a failure no new job starts, the running ones finish,
        and the first failure is raised."""
        free: queue.Queue[Slot] = queue.Queue()
        for slot in slots:
            free.put(slot)
        failed = threading.Event()

        def work(stage: Stage) -> None:
            if failed.is_set():
                return
            slot = free.get()
            try:
                self.run(stage, slot)
            except BaseException:
                failed.set()
                raise
            finally:
                free.put(slot)

        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            futures = [pool.submit(work, stage) for stage in jobs if self.pending(stage)]
        for future in futures:
            future.result()


def run_stages(stages: list[Stage], out_dir: Path, log: Callable[[str], None] = print,
               slots: list[Slot] | None = None) -> dict[str, float]:
    """Run what is not done yet, one progress line per stage, consecutive jobs side by side in `slots` (one at a
    time, in this process's environment, without slots); returns each stage's run time (0 when skipped)."""
    runner = Runner(stages, out_dir, log)
    i = 0
    while i < len(stages):
        if stages[i].job and slots:
            end = next((j for j in range(i, len(stages)) if not stages[j].job), len(stages))
            runner.run_jobs(stages[i:end], slots)
            i = end
            continue
        if runner.pending(stages[i]):
            runner.run(stages[i])
        i += 1
    return runner.times
