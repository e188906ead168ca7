"""Host-device syncs of a training launch, counted by call site on any device (issue 21).

    python -m benchmarks.host_syncs --spec student_tiny_tcd --out syncs.json [--key=value ...]

Runs the spec on one rank in this process (as `tcd_ds.cli.pretrain` would under `deepspeed --num_gpus 1`) and
counts every call that blocks the host until the device has caught up when its tensor is on a GPU: a scalar
read (`item`, `if tensor`, `float()`: aten `_local_scalar_dense`), an op whose output shape depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `bincount`, `unique`, `repeat_interleave` without
`output_size`), `tolist`, `numpy`, and the accelerator's `synchronize()`. On CPU nothing waits, but each of these
is a stall on a GPU, so the count stands in for one. The loader's thread does not count (it works on host
tensors); the training thread and the threads its backward runs on (CUDA) do. A call site is the first frame
outside torch. Writes `{"launch": {site: n}, "steps": [{site: n} for each TrainStep call]}`; the difference of two
launches of different lengths is the count per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique2.default,
                  aten.unique_consecutive.default, aten.unique_dim.default, aten._local_scalar_dense.default}
TORCH_DIR = str(Path(torch.__file__).parent)
THIS_FILE = __file__.removesuffix("c")
LOADER_THREAD = "tcd-ds-batches"  # tcd_ds.data.loader.PrefetchingBatches' thread


def site(frame) -> str:
    """`package/file.py:line` of the first frame outside torch and this module."""
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                 or frame.f_code.co_filename == THIS_FILE):
        frame = frame.f_back
    if frame is None:
        return "<torch>"
    path = frame.f_code.co_filename
    for root in ("site-packages/", "dist-packages/", f"{Path.cwd()}/"):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{path}:{frame.f_lineno}"


def owner(call_site: str) -> str:
    """Whose call it is: ours (the package, launchers, benchmarks), or the library's top-level package."""
    top = call_site.split("/", 1)[0]
    return "ours" if top in ("tcd_ds", "launchers", "benchmarks") else top


# DeepSpeed's waits per step, by file: ZeRO's gradient-norm validity check per parameter group, its overflow check
# of the step with bf16/fp16 weights, and top-1 gating's capacity (a tensor it turns into Python ints). Its
# throughput timer's synchronize() (deepspeed/utils/timer.py) is not among them: our config turns that timer off.
DEEPSPEED_ALLOWED = {"deepspeed/runtime/utils.py", "deepspeed/runtime/zero/stage_1_and_2.py",
                     "deepspeed/moe/sharded_moe.py"}


def unexpected(steps: list[dict[str, int]]) -> list[str]:
    """The call sites of `steps` (as `main` writes them) that should not wait: any of ours or of transformers,
    DeepSpeed's outside DEEPSPEED_ALLOWED, anyone else's."""
    bad = set()
    for counts in steps:
        for call_site in counts:
            file, who = call_site.rsplit(":", 1)[0], owner(call_site)
            if not (who == "deepspeed" and file in DEEPSPEED_ALLOWED):
                bad.add(call_site)
    return sorted(bad)


def blocks(func, args, kwargs) -> bool:
    if func in DATA_DEPENDENT:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):  # boolean-mask indexing
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None
    return False


class HostSyncs(TorchDispatchMode):
    """Counts the blocking calls into `counts` (swap in a fresh Counter to count a phase apart): the ops dispatched
    on the thread that enters it (and on the autograd threads that inherit its mode), and the Python-level calls
    that dispatch no op (`tolist`, `numpy`, `synchronize`, wrapped while it is active) on any thread but the
    loader's."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.cpu_only_checks = 0  # > 0 inside an op whose reads happen on CPU only
        self._restore = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.cpu_only_checks and blocks(func, args, kwargs):
            self.counts[site(sys._getframe(1))] += 1
        return func(*args, **kwargs)

    def _wrap(self, owner_obj, name: str) -> None:
        original = getattr(owner_obj, name)

        def counted(*args, **kwargs):
            if not threading.current_thread().name.startswith(LOADER_THREAD):
                self.counts[site(sys._getframe(1))] += 1
            return original(*args, **kwargs)

        setattr(owner_obj, name, counted)
        self._restore.append((owner_obj, name, original))

    def _wrap_one_hot(self) -> None:
        """`one_hot` with `num_classes` checks its indices' range by two scalar reads on CPU only (on CUDA a device
        assert does it): not a stall on a GPU."""
        original = F.one_hot

        def one_hot(tensor, num_classes=-1):
            self.cpu_only_checks += num_classes >= 0
            try:
                return original(tensor, num_classes)
            finally:
                self.cpu_only_checks -= num_classes >= 0

        F.one_hot = one_hot
        self._restore.append((F, "one_hot", original))

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        self._wrap(torch.Tensor, "tolist")
        self._wrap(torch.Tensor, "numpy")
        self._wrap(type(get_accelerator()), "synchronize")
        self._wrap_one_hot()
        if torch.cuda.is_available():
            self._wrap(torch.cuda, "synchronize")
        return super().__enter__()

    def __exit__(self, *exc):
        for owner_obj, name, original in reversed(self._restore):
            setattr(owner_obj, name, original)
        self._restore.clear()
        return super().__exit__(*exc)


@contextmanager
def counting_steps(syncs: HostSyncs, steps: list[Counter]):
    """While active, each `TrainStep.__call__` counts into its own Counter appended to `steps` (and the launch's)."""
    from tcd_ds.train.step import TrainStep

    original = TrainStep.__call__

    def counted(step_self, *args, **kwargs):
        launch, syncs.counts = syncs.counts, Counter()
        try:
            return original(step_self, *args, **kwargs)
        finally:
            steps.append(syncs.counts)
            syncs.counts = launch + syncs.counts

    TrainStep.__call__ = counted
    try:
        yield
    finally:
        TrainStep.__call__ = original


def one_rank_env() -> None:
    from tcd_ds.train.launch import free_port

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True, help="JSON file of the counts")
    args, overrides = parser.parse_known_args(argv)
    one_rank_env()
    from tcd_ds.spec import load_spec
    from tcd_ds.train.trainer import Trainer

    spec = load_spec(args.spec, overrides)
    steps: list[Counter] = []
    syncs = HostSyncs()
    with syncs, counting_steps(syncs, steps):
        Trainer(spec).fit()
    Path(args.out).write_text(json.dumps({"launch": dict(syncs.counts), "steps": [dict(s) for s in steps]}, indent=1))
    sys.stdout.flush()
    os._exit(0)  # see tcd_ds/cli/pretrain.py: exit_without_teardown


if __name__ == "__main__":
    main()
