"""How `benchmarks/bench.py` measures: clocks, interleaved rounds, matrix-product peaks, memory, phases, profiles and
model FLOPs. Nothing here knows which steps are compared (`benchmarks.variants`) or how results are shown
(`benchmarks.report`)."""

from __future__ import annotations

import statistics
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

Times = dict[str, float]  # seconds by clock: "wall", and on CPU "cpu"


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def clocks() -> tuple[str, ...]:
    """CPU time says how much work a step is where other processes take the cores; on an accelerator the host's
    CPU time says nothing about the device's work."""
    return ("wall", "cpu") if on_cpu() else ("wall",)


def sync() -> None:
    get_accelerator().synchronize()


def timed(fn: Callable[[], object], repeat: int = 1) -> Times:
    """Seconds per call, ranks started together, the device drained before and after."""
    dist.barrier()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    sync()
    return {"wall": (time.perf_counter() - wall) / repeat, "cpu": (time.process_time() - cpu) / repeat}


def every_rank(value):
    """`value` of each rank, in rank order, on every rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def rounds_of(variants: dict[str, Callable[[], object]], rounds: int, steps: int) -> dict:
    """Seconds per call of each variant in each round, order rotating across rounds, after a warm-up call.
    Wall clock: the slowest rank's (a data-parallel step ends when every rank's has); CPU time: the ranks'
    mean. `core_share`: per variant and rank, the median share of a core the process had (CPU over wall time:
    below 1 where other processes took the core or it waited on another rank)."""
    for fn in variants.values():
        fn()
    names, times = list(variants), defaultdict(list)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(variants[name], steps))
    ranks = every_rank(dict(times))
    merge = {"wall": max, "cpu": statistics.mean}
    out = {clock: {name: [merge[clock](rank[name][i][clock] for rank in ranks) for i in range(rounds)]
                   for name in names} for clock in clocks()}
    out["core_share"] = {name: [statistics.median(t["cpu"] / t["wall"] for t in rank[name]) for rank in ranks]
                         for name in names}
    return out


# ------------------------------------------------------------------------------------------- phases


class PhaseTimer:
    """Seconds spent in named phases, each drained and timed (instrumented runs only: the draining serialises
    what would overlap). A phase is a span the caller opens around its own call (`span`), or every forward of a
    module, timed by torch's forward pre- and post-hooks (`forwards`)."""

    def __init__(self):
        self.seconds: dict[str, Times] = defaultdict(lambda: {"wall": 0.0, "cpu": 0.0})

    @staticmethod
    def _start() -> tuple[float, float]:
        sync()
        return time.perf_counter(), time.process_time()

    def _stop(self, name: str, start: tuple[float, float]) -> None:
        sync()
        self.seconds[name]["wall"] += time.perf_counter() - start[0]
        self.seconds[name]["cpu"] += time.process_time() - start[1]

    @contextmanager
    def span(self, name: str):
        start = self._start()
        try:
            yield
        finally:
            self._stop(name, start)

    @contextmanager
    def forwards(self, modules: dict[str, torch.nn.Module]):
        """Time each module's forward calls under its name while the context is open; the hooks go with it."""
        started: dict[str, tuple[float, float]] = {}
        handles = []
        for name, module in modules.items():
            def before(_module, _args, _name=name) -> None:
                started[_name] = self._start()

            def after(_module, _args, _output, _name=name) -> None:
                self._stop(_name, started.pop(_name))

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# ------------------------------------------------------------------------------------------ matmul peak


def matmul_rate(m: int, k: int, n: int, device: torch.device, budget_s: float) -> Times:
    """fp32 FLOP/s of an [m, k] @ [k, n] product, by clock, repeated for about `budget_s`."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    once = timed(lambda: a @ b)["wall"]
    seconds = timed(lambda: a @ b, max(1, int(budget_s / max(once, 1e-6))))
    return {clock: 2 * m * k * n / max(t, 1e-9) for clock, t in seconds.items()}


def matmul_peaks(device: torch.device, tokens: int, hidden: int, intermediate: int, budget_s: float) -> dict:
    """The peak (the best square product) and, to tell shape from load, the model's own FFN and projection
    products; measured in the ranks' processes under the same load as the steps."""
    sizes = (256, 512, 1024) if device.type == "cpu" else (4096, 8192)
    squares = [matmul_rate(n, n, n, device, budget_s / 5) for n in sizes]
    return {
        "square": {clock: max(r[clock] for r in squares) for clock in squares[0]},
        "ffn": matmul_rate(tokens, hidden, intermediate, device, budget_s / 5),
        "projection": matmul_rate(tokens, hidden, hidden, device, budget_s / 5),
    }


def forward_flops(config, batch: int, seq_len: int, head_tokens: float, layers: int | None = None) -> float:
    """Matrix-product FLOPs of one forward (elementwise work left out): per token and layer 8H^2 for the
    q/k/v/output projections, 4TH for scores and context, 4HI for the FFN (a top-1 MoE layer: the gate's 2HE
    plus one expert's 4HI); the MLM head, 2H^2 + 2HV, at `head_tokens` tokens."""
    h, i, t, tokens = config.hidden_size, config.intermediate_size, seq_len, batch * seq_len
    moe_layers = set(getattr(config, "moe_layers", []) or [])
    total = 0.0
    for layer in range(config.num_hidden_layers if layers is None else layers):
        ffn = 4 * h * i + (2 * h * config.num_experts if layer in moe_layers else 0)
        total += tokens * (8 * h * h + 4 * t * h + ffn)
    return total + head_tokens * (2 * h * h + 2 * h * config.vocab_size)


# ----------------------------------------------------------------------------------------------- memory


def proc_status(field: str) -> int:
    """A byte count of this process from /proc/self/status (Linux), e.g. VmRSS, VmHWM."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_now() -> int:
    """Bytes in use: the accelerator allocator's, or on CPU (Linux) the process's resident set."""
    return proc_status("VmRSS") if on_cpu() else int(get_accelerator().memory_allocated())


def step_memory(fn: Callable[[], object]) -> int:
    """Bytes a call needs beyond what is resident before it (activations, gradient buffers, messages)."""
    dist.barrier()
    if on_cpu():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to VmRSS
    else:
        get_accelerator().reset_peak_memory_stats()
    before = memory_now()
    fn()
    sync()
    peak = proc_status("VmHWM") if on_cpu() else int(get_accelerator().max_memory_allocated())
    return peak - before


def parameter_memory(model: torch.nn.Module, optimizer) -> dict[str, dict[str, int]]:
    """Bytes this rank holds for its parameters, shared against expert ones: the module's weights, and from
    DeepSpeed's ZeRO-1/2 optimizer (its public `single_partition_of_fp32_groups`, `partition_count`,
    `is_moe_group`) the fp32 master partition, the reduced-gradient partition a rank keeps (sized as its master
    partition) and the wrapped torch optimizer's state (Adam's moments). ZeRO partitions a shared group over the
    data-parallel world and an expert group over its expert-data-parallel group (world / ep_size ranks): at
    ep_size == world size expert state is not partitioned at all."""
    from deepspeed.moe.utils import is_moe_param
    out = {side: defaultdict(int) for side in ("shared", "expert")}
    for p in model.parameters():
        out["expert" if is_moe_param(p) else "shared"]["model"] += p.numel() * p.element_size()
    for i, master in enumerate(getattr(optimizer, "single_partition_of_fp32_groups", [])):  # none without ZeRO
        inner = optimizer.optimizer
        side = out["expert" if optimizer.is_moe_group(inner.param_groups[i]) else "shared"]
        side["master weights"] += master.numel() * master.element_size()
        side["gradients"] += master.numel() * master.element_size()
        side["optimizer state"] += sum(t.numel() * t.element_size() for t in inner.state[master].values()
                                       if torch.is_tensor(t) and t.ndim > 0)  # not the step counter
        side["partitioned over ranks"] = optimizer.partition_count[i]
    return {side: dict(parts) for side, parts in out.items()}


# ------------------------------------------------------------------------------------------- profiles


def sync_sites(fn: Callable[[], object]) -> list[str] | None:
    """On CUDA, where one call waits on the device (torch's sync debug mode), as file:line; None elsewhere."""
    if get_accelerator().device_name() != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})


def top_ops(fn: Callable[[], object], count: int = 12) -> list[dict]:
    """The ops that take the most self time in one call, from torch's profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if get_accelerator().device_name() == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync()
    key = "self_cpu_time_total" if on_cpu() else "self_device_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, key) > 0), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    return [{"op": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
            for e in events[:count]]
