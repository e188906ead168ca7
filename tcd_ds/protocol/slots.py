"""Device slots: where the protocol's jobs (fine-tunings, probes) run side by side, one job per slot at a time.

A slot is one GPU (`CUDA_VISIBLE_DEVICES`; slots beyond the GPUs share them round-robin) and a set of CPU cores the
job is pinned to (`taskset`) with as many OpenMP/MKL threads. A job's result depends on its inputs and, on CPU, on
its thread count (float sums are split by thread), never on its slot: with the same threads per job, any number of
slots gives the serial run's numbers.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    index: int
    cores: tuple[int, ...]
    gpu: str | None  # a CUDA device id as the parent sees it; None on CPU
    pin: bool = True  # pinned to its cores (a machine shared with others may run better unpinned)

    def env(self) -> dict[str, str]:
        threads = str(len(self.cores))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` pinned to the slot's cores (unpinned where `taskset` is missing: the thread count still holds)."""
        taskset = shutil.which("taskset") if self.pin else None
        return [taskset, "--cpu-list", ",".join(map(str, sorted(set(self.cores)))), *argv] if taskset else list(argv)

    def describe(self) -> str:
        where = f"GPU {self.gpu}, " if self.gpu is not None else ""
        cores = f"cores {','.join(map(str, sorted(set(self.cores))))}" if self.pin else f"{len(self.cores)} threads"
        return f"slot {self.index} ({where}{cores})"


def node_gpus() -> list[str]:
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES' ids, else 0..n-1); none for a CPU run."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def make_slots(count: int | None = None, threads: int | None = None, pin: bool = True) -> list[Slot]:
    """`count` slots (default: one per GPU, or 1 on CPU), each with `threads` cores (default: this process's
    cores shared out evenly; more than there are reuse cores round-robin), pinned to them or not."""
    gpus = node_gpus()
    count = count or max(1, len(gpus))
    cores = sorted(os.sched_getaffinity(0))
    per = threads or max(1, len(cores) // count)
    return [Slot(i, tuple(cores[(i * per + j) % len(cores)] for j in range(per)), gpus[i % len(gpus)] if gpus else None,
                 pin) for i in range(count)]
