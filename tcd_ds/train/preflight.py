"""Checks before a launch starts its process group, for failures that would otherwise look like a silent hang."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_AFTER_MINUTES = 10


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
