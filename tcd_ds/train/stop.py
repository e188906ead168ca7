"""Ending a launch early on request, at a step boundary, so no checkpoint is cut in half.

Requests: SIGTERM to a rank (DeepSpeed's per-node launcher forwards it; schedulers send it), or the death of
the `deepspeed` runner. The W&B agent stops a run with SIGTERM to the runner, and on a single node the runner
neither handles nor forwards it (deepspeed 0.19 runner.py): it dies, and its per-node launcher and the ranks
would train on as orphans. So each rank also watches the runner, its launcher's parent.

Ranks see a request at different moments; one all-reduce per logged step makes them agree, so all stop after
the same step (a rank leaving alone would hang the others in their next collective).
"""

from __future__ import annotations

import os
import signal

import deepspeed.comm as dist
import psutil
import torch


class StopRequest:
    def __init__(self):
        self.reason: str | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        self._launcher, self._runner_pid = _deepspeed_launcher()

    def _on_signal(self, signum: int, frame) -> None:
        self.reason = signal.Signals(signum).name

    def _runner_gone(self) -> bool:
        if self._launcher is None:
            return False
        try:
            return self._launcher.ppid() != self._runner_pid  # re-parented: the runner died
        except psutil.Error:
            return True  # the launcher itself is gone

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has a request (a collective: call it on all ranks together)."""
        if self.reason is None and self._runner_gone():
            self.reason = "the deepspeed runner exited"
        flag = torch.tensor([float(self.reason is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "another rank's stop request"
        return bool(flag.item())


def _deepspeed_launcher() -> tuple[psutil.Process | None, int | None]:
    """Our parent if it is DeepSpeed's per-node launcher (deepspeed.launcher.launch), and its parent's pid."""
    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            return parent, parent.ppid()
    except psutil.Error:
        pass
    return None, None
