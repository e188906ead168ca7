"""Starting pre-training through DeepSpeed's runner, as a user does (`deepspeed ... --module tcd_ds.cli.pretrain`):
for the protocol, sweeps, tools and tests. By module, so that it runs from an installed wheel."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

PRETRAIN_MODULE = "tcd_ds.cli.pretrain"


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous (`--master_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(runner_args: list[str], spec: str | Path, overrides: list[str] = ()) -> list[str]:
    """`deepspeed RUNNER_ARGS --module tcd_ds.cli.pretrain --spec SPEC OVERRIDES`, on a free port unless one is
    given."""
    if not any(a.startswith("--master_port") for a in runner_args):
        runner_args = [*runner_args, "--master_port", str(free_port())]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *runner_args, "--module", PRETRAIN_MODULE,
            "--spec", str(spec), *overrides]
