"""Faults of the file system during a run (not writable, no space, a file that vanishes), ended the same way on
every rank: one line naming the path, the cause and the last complete checkpoint.

A rank that fails to write catches the error instead of raising it, so it still joins the next collective;
`agree` then shares every rank's verdict and all ranks raise the same FileSystemFault, which the launcher prints
as one line and exits 1 on. Without this the failing rank dies alone and the others wait in a collective for the
process-group timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import deepspeed.comm as dist


class FileSystemFault(RuntimeError):
    """The run cannot write or read its run directory; the message is one line."""


def cause(error: BaseException) -> str:
    """The OS's reason (strerror) from the error or what it was raised from: torch.save reports a full disk
    as "unexpected pos" with the OSError only as its context."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {error}".splitlines()[0]


def describe(path: str | Path | None, error: BaseException) -> str:
    path = getattr(error, "filename", None) or path
    return f"{path}: {cause(error)}"


def attempt(action: Callable[[], object], path: str | Path | None = None) -> str | None:
    """Run `action`; a file-system error becomes its one-line description (None: it worked)."""
    try:
        action()
    except (OSError, RuntimeError) as e:
        return describe(path, e)
    return None


def agree(problem: str | None, last_complete: Path | None) -> None:
    """Collective: every rank raises FileSystemFault if any rank had a `problem`."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first is not None:
        kept = last_complete if last_complete is not None else "none"
        raise FileSystemFault(f"file system fault: {first}; last complete checkpoint: {kept}")
