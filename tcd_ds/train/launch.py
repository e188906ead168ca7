"""Starting `launchers/pretrain.py` through DeepSpeed's runner, as a user does: for the protocol, tools and tests."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

PRETRAIN = Path(__file__).resolve().parents[2] / "launchers" / "pretrain.py"


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous (`--master_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(runner_args: list[str], spec: str | Path, overrides: list[str] = ()) -> list[str]:
    """`deepspeed RUNNER_ARGS launchers/pretrain.py --spec SPEC OVERRIDES`, on a free port unless one is given."""
    if not any(a.startswith("--master_port") for a in runner_args):
        runner_args = [*runner_args, "--master_port", str(free_port())]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *runner_args, str(PRETRAIN), "--spec", str(spec),
            *overrides]
