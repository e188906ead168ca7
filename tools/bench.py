"""Benchmarks of the training steps, side by side on the same shapes in one run (issue 8).

    DS_ACCELERATOR=cpu python tools/bench.py [--out runs/bench] [--ranks 2] [--rounds 8] [--quick]

Measures, on the demo shapes (ds_configs/*_demo*.yaml; --quick: the tiny test shapes, a couple of steps): our
dense step against what a user would write (HF `BertForMaskedLM`, `torch.optim.AdamW`, DDP); the MoE step with
MLM only against the full TCD step, with a per-phase breakdown; achieved model FLOP/s against an fp32
matrix-product peak measured in the same processes; memory per rank; the relation losses' cost as N grows,
local against global scope; one rank against `--ranks` ranks at a fixed per-rank batch; a profile of each step.

Each step is the real one: components are built by `Trainer` from a run spec and stepped by its
`DistillationEngine`. On a machine shared with other work, timings are noisy: variants are interleaved round
after round in the same processes (the order rotating), ratios are taken within a round and their median over
rounds reported. On CPU every time is also taken as the ranks' CPU time, which leaves out time lost waiting
for a core (and for the other ranks). Writes OUT/bench.json and OUT/bench.md, and prints the markdown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import multiprocessing.util
import os
import shutil
import socket
import statistics
import sys
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import logger  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from tcd_ds.data.loader import seeded_generator  # noqa: E402
from tcd_ds.distill.relations import RelationDistiller  # noqa: E402
from tcd_ds.models.bert import bert_kwargs  # noqa: E402
from tcd_ds.spec import RunSpec, load_spec  # noqa: E402
from tcd_ds.train.trainer import Trainer, seed_step  # noqa: E402

PRESETS = {  # dense, MoE baseline, MoE + TCD
    "demo": ("teacher_demo.yaml", "student_demo_moe.yaml", "student_demo_tcd.yaml"),
    "quick": ("teacher_tiny.yaml", "student_tiny_moe.yaml", "student_tiny_tcd.yaml"),
}
TARGETS = {  # name: (metric, bound, "max" if the value must stay at or below the bound else "min")
    "TCD step / MoE MLM-only step": ("tcd_over_moe", 1.40, "max"),
    "dense tokens/s / HF baseline tokens/s": ("dense_over_hf", 1.5, "min"),
    "relation losses / TCD step": ("relation_share", 0.05, "max"),
    "MFU, dense step": ("mfu_dense", 0.50, "min"),
    "MFU, MoE step": ("mfu_moe", 0.50, "min"),
    "MFU, TCD step": ("mfu_tcd", 0.50, "min"),
    "N ranks / 1 rank tokens/s, TCD step": ("scaling_tcd", 1.8, "min"),
}
STEPS = {"hf": "HF BertForMaskedLM + torch AdamW (DDP)", "dense_full_head": "ours, dense, full MLM head",
         "dense": "ours, dense", "moe": "ours, MoE, MLM only", "tcd": "ours, MoE + TCD"}
Batch = dict[str, torch.Tensor]
Times = dict[str, float]  # seconds by clock: "wall", and on CPU "cpu"


# ---------------------------------------------------------------------------------------------- measuring


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


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_now() -> int:
    """Bytes in use: the accelerator allocator's, or on CPU (Linux) the process's resident set."""
    return _proc_status("VmRSS") if on_cpu() else int(get_accelerator().memory_allocated())


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
    peak = _proc_status("VmHWM") if on_cpu() else int(get_accelerator().max_memory_allocated())
    return peak - before


@contextmanager
def phase_timers(seconds: dict[str, Times], calls: dict[str, tuple[object, str]]):
    """Wrap the named methods of the step's own objects so each call is drained and timed (instrumented runs
    only: the draining serialises what would overlap)."""
    for name, (obj, attr) in calls.items():
        original = getattr(obj, attr)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            out = _original(*args, **kwargs)
            sync()
            seconds[_name]["wall"] += time.perf_counter() - wall
            seconds[_name]["cpu"] += time.process_time() - cpu
            return out

        setattr(obj, attr, wrapper)
    try:
        yield
    finally:
        for obj, attr in calls.values():
            delattr(obj, attr)  # back to the class's method


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


# ----------------------------------------------------------------------------------------------- FLOPs


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


# ------------------------------------------------------------------------------------------- the steps


def run_spec(preset: str, kind: str, run_dir: Path, cache_dir: str, world: int, teacher: Path | None = None,
             extra: tuple[str, ...] = ()) -> RunSpec:
    """A preset's spec with one micro-batch per rank per step (a fixed per-rank batch whatever the world)."""
    path = REPO / "ds_configs" / dict(zip(("dense", "moe", "tcd"), PRESETS[preset]))[kind]
    teacher_arg = [f"--distill.teacher={teacher}"] if kind == "tcd" else []
    base = load_spec(path, teacher_arg)
    overrides = [
        f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", "--train.steps=100000",
        f"--train.global_batch_size={base.train.micro_batch_size * world}",
        "--logging.progress_bar=False", "--logging.wandb.enabled=False", *teacher_arg,
    ]
    if kind != "dense":
        overrides.append(f"--model.moe.ep_size={math.gcd(base.model.moe.ep_size, world)}")
    return load_spec(path, [*overrides, *extra])


def build(kind: str, cfg: dict, world: int, run_dir: Path, teacher: Path | None = None) -> Trainer:
    return Trainer(run_spec(cfg["preset"], kind, run_dir, cfg["cache_dir"], world, teacher))


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class HFBaseline:
    """What a user writes: HF `BertForMaskedLM` (HF's default attention), `torch.optim.AdamW` over all
    parameters, DDP across ranks, the same gradient clipping as ours. Starts from our dense model's weights."""

    def __init__(self, spec: RunSpec, ours: torch.nn.Module, device: torch.device):
        kwargs = bert_kwargs(spec.model, ours.config.vocab_size, ours.config.pad_token_id)
        kwargs.pop("attn_implementation")
        model = BertForMaskedLM(BertConfig(**kwargs)).to(device)
        model.load_state_dict(ours.state_dict())
        self.attn_implementation = model.config._attn_implementation
        self.model = model
        if dist.get_world_size() > 1:
            device_ids = None if device.type == "cpu" else [device.index]
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        o = spec.optim
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.grad_clip = o.grad_clip
        self.device = device

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.model(**to_device(batch, self.device)).loss

    def step(self, batch: Batch) -> None:
        self.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def full_head_step(trainer: Trainer, batch: Batch) -> None:
    """Our dense step without the masked-head fast path: HF's forward computes logits at every token."""
    b = to_device(batch, trainer.engine.device)
    out = trainer.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    trainer.engine.backward(out.loss)
    trainer.engine.step()


class Stepper:
    """One variant's optimizer steps over a fixed set of host batches, with its own step counter (which seeds
    dropout, routing noise and sampled positions as in `Trainer.fit`)."""

    def __init__(self, fn: Callable[[list[Batch], int], object], batches: list[list[Batch]], seed: int, rank: int):
        self.fn, self.batches, self.seed, self.rank, self.count = fn, batches, seed, rank, 0

    def __call__(self) -> None:
        seed_step(self.seed, self.count, self.rank)
        self.fn(self.batches[self.count % len(self.batches)], self.count)
        self.count += 1


def engine_stepper(trainer: Trainer, batches: list[list[Batch]]) -> Stepper:
    return Stepper(trainer.step_engine.step, batches, trainer.spec.seed, trainer.rank)


def captures_of(trainer: Trainer, batch: Batch) -> tuple[dict, dict]:
    """Copies of what the taps of both models capture on `batch` (the student's as fresh leaves)."""
    b = to_device(batch, trainer.engine.device)
    distillation = trainer.distillation
    distillation.teacher_forward(b)
    with torch.no_grad():
        trainer.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    student = {loc: [t.detach().clone().requires_grad_() for t in slots]
               for loc, slots in distillation.student_taps.captures.items()}
    teacher = {loc: [t.clone() for t in slots] for loc, slots in distillation.teacher_taps.captures.items()}
    distillation.student_taps.clear()
    distillation.teacher_taps.clear()
    return student, teacher


def relation_bench(distiller: RelationDistiller, captures: tuple[dict, dict], mask: torch.Tensor) -> Callable:
    """The relation losses alone, forward and backward, on a step's captures (the student's gradient stops at
    the captures, where the model's backward would take over)."""
    student, teacher = captures
    draws = itertools.count()

    def run() -> None:
        generator = seeded_generator(0, "bench", next(draws), dist.get_rank())
        distiller.weighted_sum(distiller(student, teacher, mask, generator)).backward()

    return run


def mlm_loss_check(dense: Trainer, moe: Trainer, hf: HFBaseline, batch: Batch) -> dict:
    """The masked-head MLM loss against HF's full-head forward, same weights and dropout draws."""
    def seeded(fn):
        seed_step(dense.spec.seed, 0, dense.rank)
        return fn().item()

    b = to_device(batch, dense.engine.device)
    return {
        "dense": {"ours": seeded(lambda: dense.step_engine.losses(batch, 0, 0)["mlm"]),
                  "hf_full_head": seeded(lambda: hf.loss(batch))},
        "moe": {"ours": seeded(lambda: moe.step_engine.losses(batch, 0, 0)["mlm"]),
                "full_head": seeded(lambda: moe.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                        labels=b["labels"]).loss)},
    }


def phase_breakdown(trainer: Trainer, batches: list[list[Batch]], steps: int) -> dict[str, Times]:
    """Seconds per step in each phase of the real step, each call drained and timed."""
    calls = {"teacher forward": (trainer.distillation, "teacher_forward"),
             "student forward": (trainer.engine, "forward"),
             "relation losses (forward)": (trainer.distillation, "relation_losses"),
             "backward (student and relations)": (trainer.engine, "backward"),
             "optimizer step": (trainer.engine, "step")}
    calls = {name: call for name, call in calls.items() if call[0] is not None}
    phases: dict[str, Times] = defaultdict(lambda: {"wall": 0.0, "cpu": 0.0})
    with phase_timers(phases, calls):
        total = timed(engine_stepper(trainer, batches), steps)
    out = {name: {c: t / steps for c, t in times.items()} for name, times in phases.items()}
    out["other"] = {c: total[c] - sum(times[c] for times in out.values()) for c in total}
    return {**out, "total": total}


# --------------------------------------------------------------------------------------------- worlds


def init_rank(rank: int, world: int, port: int, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logger.setLevel(logging.WARNING)


def every_rank(value):
    """`value` of each rank, in rank order, on every rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def rounds_of(variants: dict[str, Callable], rounds: int, steps: int) -> dict:
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


def end_world() -> None:
    """A world's processes end here, once every rank is done, without tearing the process group down: a DDP
    reducer (the HF baseline's) freed after its gloo group is destroyed can deadlock in the group's destructor,
    and the results are already on disk. multiprocessing's own exit work still runs (it releases semaphores)."""
    dist.barrier()
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Everything but the 1-rank comparison and the memory, in one world of `world` ranks."""
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    dense = build("dense", cfg, world, work / "teacher")
    # The teacher, a DeepSpeed checkpoint of this run dir: timings do not depend on its weights.
    dense.engine.save_checkpoint(str(dense.run_dir / "checkpoints"), tag="step_0")
    moe = build("moe", cfg, world, work / "moe")
    tcd = build("tcd", cfg, world, work / "tcd", teacher=dense.run_dir)
    device, config = dense.engine.device, dense.model.config
    hf = HFBaseline(dense.spec, dense.model, device)
    batches = [dense.train_batches.micro_batches(s) for s in range(4)]
    assert all(len(b) == 1 for b in batches)  # one micro-batch per rank per step
    first = batches[0][0]
    losses = mlm_loss_check(dense, moe, hf, first)

    # The teacher as it would be without the cut: every layer, and the MLM head at every token.
    full_teacher = BertForMaskedLM(config).to(device).eval().requires_grad_(False)
    full_teacher.load_state_dict(dense.model.state_dict())
    on_device, captures = to_device(first, device), captures_of(tcd, first)
    seed, peaks = dense.spec.seed, []
    variants = {
        "peak": lambda: peaks.append(matmul_peaks(device, first["input_ids"].numel(), config.hidden_size,
                                                  config.intermediate_size, cfg["peak_budget_s"])),
        "hf": Stepper(lambda mb, s: hf.step(mb[0]), batches, seed, rank),
        "dense_full_head": Stepper(lambda mb, s: full_head_step(dense, mb[0]), batches, seed, rank),
        "dense": engine_stepper(dense, batches),
        "moe": engine_stepper(moe, batches),
        "tcd": engine_stepper(tcd, batches),
        "teacher_full": torch.no_grad()(lambda: full_teacher(on_device["input_ids"], on_device["attention_mask"])),
        "teacher_cut": lambda: tcd.distillation.teacher_forward(on_device),
        "relations": relation_bench(tcd.distillation.distiller, captures, first["attention_mask"]),
    }
    seconds = rounds_of(variants, cfg["rounds"], cfg["steps"])
    flop_rates = {clock: {kind: [statistics.mean(p[kind][clock] for p in ranks)  # mean over ranks
                                 for ranks in zip(*every_rank(peaks[1:]))]  # the first call was the warm-up
                          for kind in ("square", "ffn", "projection")} for clock in clocks()}

    breakdown = {name: phase_breakdown(t, batches, cfg["rounds"]) for name, t in (("moe", moe), ("tcd", tcd))}
    scan, d = {}, tcd.spec.distill  # relation losses against N, local and global scope, interleaved
    for n in cfg["relation_ns"]:
        for scope in ("local", "global"):
            spec = d.model_copy(update={"num_positions": n, "scope": scope})
            distiller = RelationDistiller(spec, tcd.distillation.distiller.plan, config.num_attention_heads)
            scan[f"{n}/{scope}"] = relation_bench(distiller, captures, first["attention_mask"])
    relation_seconds = rounds_of(scan, cfg["rounds"], 3)
    profiles = {name: top_ops(variants[name]) for name in ("hf", "dense", "moe", "tcd")}
    syncs = {name: sync_sites(variants[name]) for name in ("dense", "moe", "tcd")}

    if rank == 0:
        masked = statistics.mean(int((mb[0]["labels"] != -100).sum()) for mb in batches)
        batch, seq_len = first["input_ids"].shape
        tokens, moe_config = batch * seq_len, tcd.model.config
        layers = tcd.distillation.distiller.plan.layers_needed()
        flops = {  # forward and backward (twice the forward); the frozen teacher forward only
            "hf": 3 * forward_flops(config, batch, seq_len, tokens),
            "dense_full_head": 3 * forward_flops(config, batch, seq_len, tokens),
            "dense": 3 * forward_flops(config, batch, seq_len, masked),
            "moe": 3 * forward_flops(moe_config, batch, seq_len, masked),
            "tcd": 3 * forward_flops(moe_config, batch, seq_len, masked)
            + forward_flops(config, batch, seq_len, 0, layers=layers),
        }
        out = {
            "world_size": world, "tokens_per_rank_per_step": tokens, "masked_tokens_per_rank_per_step": masked,
            "shapes": {"micro_batch": batch, "seq_len": seq_len, "hidden": config.hidden_size,
                       "intermediate": config.intermediate_size, "layers": config.num_hidden_layers,
                       "heads": config.num_attention_heads, "vocab": config.vocab_size,
                       "experts": moe_config.num_experts, "moe_layers": moe_config.moe_layers},
            "hf_attn_implementation": hf.attn_implementation, "teacher_layers": layers, "mlm_loss_check": losses,
            "seconds": seconds, "matmul_flops": flop_rates, "flops_per_step_per_rank": flops,
            "breakdown": breakdown, "relation_seconds": relation_seconds, "profiles": profiles,
            "sync_sites": syncs, "load_average": os.getloadavg(),
        }
        (work / "main.json").write_text(json.dumps(out))
    end_world()


def scaling_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Steps at a fixed per-rank batch in a world of `world` ranks, for the 1-rank comparison."""
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    trainers = {kind: build(kind, cfg, world, work / f"scale{world}_{kind}", teacher=work / "teacher")
                for kind in ("dense", "moe", "tcd")}
    batches = [trainers["dense"].train_batches.micro_batches(s) for s in range(4)]
    seconds = rounds_of({kind: engine_stepper(t, batches) for kind, t in trainers.items()},
                        cfg["scaling_blocks"], cfg["steps"])
    if rank == 0:
        with (work / "scaling.jsonl").open("a") as f:
            f.write(json.dumps({"world_size": world, "seconds": seconds, "load_average": os.getloadavg()}) + "\n")
    end_world()


def memory_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Per rank: the floor (interpreter, libraries, process group); the state each variant holds after its
    first step (model, gradients, optimizer state; the data pipeline for the first built); what a step needs on
    top of it. On CPU the launch runs with glibc's mmap threshold low, so that freed tensors leave the resident
    set at once and it tracks the live bytes."""
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    floor, state, step, trainers = memory_now(), {}, {}, {}
    for kind in ("dense", "moe", "tcd", "hf"):
        before = memory_now()
        if kind == "hf":
            dense = trainers["dense"]
            hf = HFBaseline(dense.spec, dense.model, dense.engine.device)
            stepper = Stepper(lambda mb, s: hf.step(mb[0]), batches, 0, rank)
        else:
            trainers[kind] = build(kind, cfg, world, work / f"memory_{kind}", teacher=work / "teacher")
            if kind == "dense":
                batches = [trainers[kind].train_batches.micro_batches(s) for s in range(2)]
            stepper = engine_stepper(trainers[kind], batches)
        stepper()  # the first step allocates the optimizer's state
        state[kind] = memory_now() - before
        step[kind] = step_memory(stepper)
    memory = {"floor": every_rank(floor), "state": every_rank(state), "step": every_rank(step)}
    if rank == 0:
        (work / "memory.json").write_text(json.dumps(memory))
    end_world()


def spawn(fn: Callable, world: int, cfg: dict, env: dict[str, str] | None = None) -> None:
    """`fn(rank, world, port, cfg)` on `world` fresh processes, with `env` added to their environment."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(fn, args=(world, port, cfg), nprocs=world, join=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------- report


def spread(values: list[float], best: float) -> dict:
    """`best`: the same ratio of each side's best time, an estimate that ignores time lost to other processes."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "best": best,
            "rounds": values}


def ratios_on(clock: str, main: dict, scaling: list[dict]) -> dict[str, dict]:
    """Every ratio on one clock: within each round, and of the best times."""
    s, flops, peak = main["seconds"][clock], main["flops_per_step_per_rank"], main["matmul_flops"][clock]
    rounds, world = range(len(s["dense"])), main["world_size"]

    def ratio(a: str, b: str) -> tuple[list[float], float]:
        return [s[a][r] / s[b][r] for r in rounds], min(s[a]) / min(s[b])

    measured = {
        "tcd_over_moe": ratio("tcd", "moe"),
        "dense_over_hf": ratio("hf", "dense"),
        "relation_share": ratio("relations", "tcd"),
        **{f"mfu_{v}": ([flops[v] / s[v][r] / peak["square"][r] for r in rounds],
                        flops[v] / min(s[v]) / max(peak["square"])) for v in STEPS},
        "masked_head_speedup": ratio("dense_full_head", "dense"),
        "teacher_cut_speedup": ratio("teacher_full", "teacher_cut"),
        **{f"{kind}_matmul_over_peak": ([peak[kind][r] / peak["square"][r] for r in rounds],
                                        max(peak[kind]) / max(peak["square"])) for kind in ("ffn", "projection")},
    }
    pairs = list(zip(scaling[0::2], scaling[1::2]))  # launches alternate: 1 rank, then `world` ranks
    for kind in ("dense", "moe", "tcd") if pairs else ():
        # Tokens/s at a fixed per-rank batch: world * t(1 rank) / t(world ranks), per pair of adjacent launches.
        runs = {w: [t for rec in scaling if rec["world_size"] == w for t in rec["seconds"][clock][kind]]
                for w in (1, world)}
        measured[f"scaling_{kind}"] = (
            [world * statistics.median(one["seconds"][clock][kind]) / statistics.median(many["seconds"][clock][kind])
             for one, many in pairs],
            world * min(runs[1]) / min(runs[world]),
        )
    return {name: spread(*values) for name, values in measured.items()}


def summarize(main: dict, memory: dict, scaling: list[dict], args: argparse.Namespace, command: str) -> dict:
    """Verdicts on CPU time where there is one (the work a step is, whatever else the machine runs), except
    for scaling, which is about wall clock (it includes waiting on the other ranks)."""
    ratios = {clock: ratios_on(clock, main, scaling) for clock in clocks()}
    targets = []
    for name, (key, bound, kind) in TARGETS.items():
        clock = "wall" if key.startswith("scaling") or not on_cpu() else "cpu"
        value = ratios[clock][key]["median"] if key in ratios[clock] else None
        met = None if value is None else (value <= bound if kind == "max" else value >= bound)
        targets.append({"target": name, "key": key, "bound": bound, "kind": kind, "clock": clock, "value": value,
                        "met": met})
    world, tokens = main["world_size"], main["tokens_per_rank_per_step"]
    steps = {clock: {v: {"seconds": statistics.median(main["seconds"][clock][v]),
                         "tokens_per_s": world * tokens / statistics.median(main["seconds"][clock][v])}
                     for v in STEPS} for clock in clocks()}
    mib = {part: [{k: b / 2**20 for k, b in rank.items()} if isinstance(rank, dict) else rank / 2**20
                  for rank in ranks] for part, ranks in memory.items()}
    return {
        "command": command, "preset": "quick" if args.quick else "demo", "device": get_accelerator().device_name(),
        "world_size": world, "threads_per_rank": args.threads, "torch": torch.__version__, "clocks": clocks(),
        "rounds": args.rounds, "steps_per_round": args.steps, "tokens_per_rank_per_step": tokens,
        "masked_tokens_per_rank_per_step": main["masked_tokens_per_rank_per_step"], "shapes": main["shapes"],
        "hf_attn_implementation": main["hf_attn_implementation"], "teacher_layers": main["teacher_layers"],
        "mlm_loss_check": main["mlm_loss_check"], "targets": targets, "ratios": ratios, "steps": steps,
        "core_share": main["seconds"]["core_share"], "load_average": main["load_average"],
        "matmul_peak_flops_per_rank": {c: statistics.median(main["matmul_flops"][c]["square"]) for c in clocks()},
        "breakdown": main["breakdown"], "memory_mib": mib,
        "relations_ms": {c: {key: 1e3 * statistics.median(v) for key, v in main["relation_seconds"][c].items()}
                         for c in clocks()},
        "seconds": main["seconds"], "matmul_flops": main["matmul_flops"],
        "flops_per_step_per_rank": main["flops_per_step_per_rank"], "scaling": scaling,
        "profiles": main["profiles"], "sync_sites": main["sync_sites"],
    }


def verdict(t: dict) -> str:
    if t["value"] is None:
        return "not measured (needs more than one rank)"
    off = 100 * (t["value"] / t["bound"] - 1)
    return f"{'met' if t['met'] else '**missed**'} on {t['clock']} ({off:+.0f}% against the bound)"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(r: dict) -> str:
    cs = r["clocks"]

    def shown(clock: str, key: str) -> str:
        q = r["ratios"][clock].get(key)
        return "-" if q is None else f"{q['median']:.3f} ({q['min']:.3f} to {q['max']:.3f}); best {q['best']:.3f}"

    peak = ", ".join(f"{r['matmul_peak_flops_per_rank'][c] / 1e9:.1f} on {c}" for c in cs)
    lines = [f"Command: `{r['command']}`", "",
             f"{r['device']}, {r['world_size']} ranks x {r['threads_per_rank']} thread(s), torch {r['torch']}; "
             f"{r['tokens_per_rank_per_step']} tokens per rank per step ({r['masked_tokens_per_rank_per_step']:.0f} "
             f"masked); {r['rounds']} interleaved rounds x {r['steps_per_round']} step(s). Each ratio: the median "
             f"(min to max) over rounds of the ratio within a round; best: the ratio of each side's best time. "
             f"fp32 matrix-product peak, GFLOP/s per rank: {peak}. Load average at the end: "
             f"{r['load_average'][0]:.1f}.", ""]
    lines += table(["target", "bound", *(f"measured, {c}" for c in cs), "verdict"], [
        [t["target"], f"{'<=' if t['kind'] == 'max' else '>='} {t['bound']}", *(shown(c, t["key"]) for c in cs),
         verdict(t)] for t in r["targets"]])
    lines += [""] + table(["step", *(f"s/step, {c}" for c in cs), *(f"tokens/s, {c}" for c in cs),
                           *(f"MFU, {c}" for c in cs), "core share per rank"], [
        [name, *(f"{r['steps'][c][v]['seconds']:.3f}" for c in cs),
         *(f"{r['steps'][c][v]['tokens_per_s']:.0f}" for c in cs),
         *(f"{100 * r['ratios'][c][f'mfu_{v}']['median']:.0f}%" for c in cs),
         " / ".join(f"{x:.2f}" for x in r["core_share"][v])] for v, name in STEPS.items()])
    others = ("masked_head_speedup", "teacher_cut_speedup", "ffn_matmul_over_peak", "projection_matmul_over_peak",
              "scaling_dense", "scaling_moe", "scaling_tcd")
    lines += [""] + table(["other ratio", *(f"measured, {c}" for c in cs)],
                          [[k, *(shown(c, k) for c in cs)] for k in others if k in r["ratios"]["wall"]])
    for name, phases in r["breakdown"].items():
        lines += ["", f"Phases of the {name} step, ms (share), each call drained and timed:", ""]
        lines += table(["phase", *cs], [[phase, *(f"{1e3 * t[c]:.1f} ({100 * t[c] / phases['total'][c]:.0f}%)"
                                                  for c in cs)] for phase, t in phases.items()])
    ns = sorted({int(key.split("/")[0]) for key in r["relations_ms"]["wall"]})
    lines += ["", "Relation losses alone, forward + backward, ms per call:", ""]
    lines += table(["scope, clock"] + [f"N={n}" for n in ns],
                   [[f"{scope}, {c}"] + [f"{r['relations_ms'][c][f'{n}/{scope}']:.2f}" for n in ns]
                    for scope in ("local", "global") for c in cs])
    mem = r["memory_mib"]
    lines += ["", "Memory per rank, MiB (rank 0 / rank 1 ...): the state each variant holds after its first step "
              "(the dense one includes the data pipeline), and what a step needs on top of it:", ""]
    lines += table(["", "hf", "dense", "moe", "tcd"], [
        [part] + [" / ".join(f"{rank[v]:.0f}" for rank in mem[part]) for v in ("hf", "dense", "moe", "tcd")]
        for part in ("state", "step")])
    floor = " / ".join(f"{m:.0f}" for m in mem["floor"])
    lines.append(f"\nFloor (interpreter, libraries, process group): {floor} MiB.")
    if r["scaling"]:
        lines += ["", "Scaling launches in the order run (fixed per-rank batch): ms per step by clock, median over "
                  "blocks; the TCD step's core share per rank; the load average:", ""]
        kinds = ("dense", "moe", "tcd")
        lines += table(["ranks", *(f"{k}, {c}" for k in kinds for c in cs), "core share, tcd", "load"], [
            [rec["world_size"], *(f"{1e3 * statistics.median(rec['seconds'][c][k]):.0f}" for k in kinds for c in cs),
             " / ".join(f"{x:.2f}" for x in rec["seconds"]["core_share"]["tcd"]), f"{rec['load_average'][0]:.1f}"]
            for rec in r["scaling"]])
    for name, ops in r["profiles"].items():
        lines += ["", f"Profile of one {name} step, rank 0, top ops by self time:", ""]
        lines += table(["op", "ms", "share", "calls"],
                       [[f"`{o['op']}`", f"{o['ms']:.1f}", f"{100 * o['share']:.0f}%", o["calls"]] for o in ops])
    if any(v is not None for v in r["sync_sites"].values()):
        lines += ["", f"Host-device syncs in one step (file:line): {json.dumps(r['sync_sites'])}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ expert count (issue 13)


EXPERT_VARIANTS = {  # name: (kind, overrides of the MoE preset, label); same shapes and batch as the dense step
    "dense": ("dense", (), "dense"),
    "moe8": ("moe", ("--model.moe.num_experts=8", "--model.moe.layers=every_other"), "8 experts, every other layer"),
    "moe64": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every_other"),
              "64 experts, every other layer"),
    "moe64_every": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every"), "64 experts, every layer"),
    "moe64_loop": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every_other"),
                   "64 experts, every other layer, DeepSpeed's per-expert loop"),
}
EXPERT_TARGETS = [("moe64", "dense", 0.85), ("moe64", "moe8", 0.95), ("moe64_every", "dense", 0.75)]


def with_deepspeed_loop(trainer: Trainer) -> Trainer:
    """The student with DeepSpeed's own `Experts.forward` (the per-expert loop) on the same parameters."""
    from deepspeed.moe.experts import Experts
    for block in trainer.model.moe_blocks().values():
        block.deepspeed_moe.experts.__class__ = Experts
    return trainer


def parameter_memory(trainer: Trainer) -> dict[str, dict[str, int]]:
    """Bytes this rank holds, shared against expert parameters: the module's weights; ZeRO's fp32 master copy,
    gradient partition (the reduced gradients a rank keeps, sized as its master partition) and Adam moments.
    ZeRO partitions shared groups over the data-parallel world and expert groups over the expert-data-parallel
    group (world / ep_size ranks), so at ep_size == world size the expert state is not partitioned at all."""
    from deepspeed.moe.utils import is_moe_param
    out = {side: defaultdict(int) for side in ("shared", "expert")}
    for p in trainer.model.parameters():
        out["expert" if is_moe_param(p) else "shared"]["model"] += p.numel() * p.element_size()
    opt = trainer.engine.optimizer
    for i, master in enumerate(getattr(opt, "single_partition_of_fp32_groups", [])):
        side = out["expert" if opt.is_moe_group(opt.optimizer.param_groups[i]) else "shared"]
        side["master weights"] += master.numel() * master.element_size()
        side["gradients"] += master.numel() * master.element_size()
        side["optimizer state"] += sum(t.numel() * t.element_size() for t in opt.optimizer.state[master].values()
                                       if torch.is_tensor(t) and t.ndim > 0)
        side["partitioned over ranks"] = opt.partition_count[i]
    return {side: dict(parts) for side, parts in out.items()}


def experts_world(rank: int, world: int, port: int, cfg: dict) -> None:
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    trainers = {}
    for name, (kind, extra, _) in EXPERT_VARIANTS.items():
        spec = run_spec(cfg["preset"], kind, work / name, cfg["cache_dir"], world, extra=extra)
        trainers[name] = Trainer(spec)
    with_deepspeed_loop(trainers["moe64_loop"])
    batches = [trainers["dense"].train_batches.micro_batches(s) for s in range(4)]
    variants = {name: engine_stepper(t, batches) for name, t in trainers.items()}
    seconds = rounds_of(variants, cfg["rounds"], cfg["steps"])
    breakdown = {name: phase_breakdown(trainers[name], batches, cfg["rounds"]) for name in ("dense", "moe64")}
    profiles = {name: top_ops(variants[name]) for name in ("dense", "moe8", "moe64", "moe64_every", "moe64_loop")}
    memory = every_rank({name: parameter_memory(t) for name, t in trainers.items()})
    if rank == 0:
        first = batches[0][0]["input_ids"]
        out = {"world_size": world, "tokens_per_rank_per_step": first.numel(), "seconds": seconds,
               "breakdown": breakdown, "profiles": profiles, "memory": memory, "load_average": os.getloadavg(),
               "ep_size": {n: t.model.config.ep_size for n, t in trainers.items() if n != "dense"},
               "parameters": {n: sum(p.numel() for p in t.model.parameters()) for n, t in trainers.items()}}
        (work / "experts.json").write_text(json.dumps(out))
    end_world()


def experts_markdown(r: dict, command: str) -> str:
    cs, world, tokens = clocks(), r["world_size"], r["tokens_per_rank_per_step"]
    s = r["seconds"]

    def ratio(a: str, b: str, clock: str) -> list[float]:  # tokens/s of a over b, within each round
        return [tb / ta for ta, tb in zip(s[clock][a], s[clock][b])]

    def shown(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"

    lines = [f"Command: `{command}`", "",
             f"{get_accelerator().device_name()}, {world} ranks, {tokens} tokens per rank per step, "
             f"{len(s['wall']['dense'])} interleaved rounds; ratios: median (min to max) over rounds of the ratio "
             f"within a round. Load average at the end: {r['load_average'][0]:.1f}.", ""]
    lines += table(["student", "params per rank", "ep_size", *(f"tokens/s, {c}" for c in cs),
                    *(f"vs dense, {c}" for c in cs), *(f"vs 8 experts, {c}" for c in cs)], [
        [label, f"{r['parameters'][n] / 1e6:.1f}M", r["ep_size"].get(n, "-"),
         *(f"{world * tokens / statistics.median(s[c][n]):.0f}" for c in cs),
         *(shown(ratio(n, "dense", c)) for c in cs), *(shown(ratio(n, "moe8", c)) for c in cs)]
        for n, (_, _, label) in EXPERT_VARIANTS.items()])
    clock = "cpu" if on_cpu() else "wall"
    lines += ["", f"Targets (tokens/s ratio, {clock} time):", ""]
    lines += table(["ratio", "bound", "measured", "verdict"], [
        [f"{EXPERT_VARIANTS[a][2]} / {EXPERT_VARIANTS[b][2]}", f">= {bound}", shown(ratio(a, b, clock)),
         "met" if statistics.median(ratio(a, b, clock)) >= bound else "**missed**"] for a, b, bound in EXPERT_TARGETS])
    for name, phases in r["breakdown"].items():
        lines += ["", f"Phases of the {EXPERT_VARIANTS[name][2]} step, ms (share), each call drained and timed:", ""]
        lines += table(["phase", *cs], [[phase, *(f"{1e3 * t[c]:.1f} ({100 * t[c] / phases['total'][c]:.0f}%)"
                                                  for c in cs)] for phase, t in phases.items()])
    mib = 2**20
    lines += ["", "Memory per rank, MiB (rank 0), shared / expert parameters; ZeRO partitions each over the ranks "
              "shown:", ""]
    parts = ("model", "gradients", "master weights", "optimizer state")
    lines += table(["student", *parts, "partitioned over"], [
        [EXPERT_VARIANTS[n][2], *(" / ".join(f"{m[side].get(part, 0) / mib:.1f}" for side in ("shared", "expert"))
                                  for part in parts),
         " / ".join(str(m[side].get("partitioned over ranks", "-")) for side in ("shared", "expert"))]
        for n, m in r["memory"][0].items()])
    for name, ops in r["profiles"].items():
        lines += ["", f"Profile of one {EXPERT_VARIANTS[name][2]} step, rank 0, top ops by self time:", ""]
        lines += table(["op", "ms", "share", "calls"],
                       [[f"`{o['op']}`", f"{o['ms']:.1f}", f"{100 * o['share']:.0f}%", o["calls"]] for o in ops])
    return "\n".join(lines) + "\n"


def experts_main(cfg: dict, out: Path, command: str) -> int:
    """The expert-count comparison alone: OUT/experts.json and OUT/experts.md."""
    spawn(experts_world, cfg["ranks"], cfg)
    results = json.loads((Path(cfg["work"]) / "experts.json").read_text())
    (out / "experts.json").write_text(json.dumps(results, indent=1))
    report = experts_markdown(results, command)
    (out / "experts.md").write_text(report)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="directory for bench.json, bench.md and work files")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the main world (capped at the devices)")
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the main comparisons")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per variant per round")
    parser.add_argument("--scaling-rounds", type=int, default=2, help="interleaved (1 rank, N ranks) launch pairs")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "tcd_ds"), help="tokenizer and data cache")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a couple of steps: checks it runs")
    parser.add_argument("--experts", action="store_true", help="only the expert-count comparison (issue 13)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.scaling_rounds = 2, 1, 1
    accelerator = get_accelerator()
    if not on_cpu():
        args.ranks = min(args.ranks, accelerator.device_count())
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    out = Path(args.out).resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chdir(REPO)  # the presets' data paths are relative to the repository
    cfg = {
        "work": str(work), "preset": "quick" if args.quick else "demo", "cache_dir": args.cache_dir,
        "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
        "peak_budget_s": 0.1 if args.quick else 0.5, "relation_ns": [8, 16] if args.quick else [32, 64, 128, 256, 512],
        "scaling_blocks": 2 if args.quick else 4, "ranks": args.ranks,
    }
    command = "DS_ACCELERATOR=cpu " * on_cpu() + "python tools/bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.experts:
        return experts_main(cfg, out, command.strip())
    spawn(main_world, args.ranks, cfg)
    for _ in range(args.scaling_rounds if args.ranks > 1 else 0):
        spawn(scaling_world, 1, cfg)
        spawn(scaling_world, args.ranks, cfg)
    spawn(memory_world, args.ranks, cfg, env={"MALLOC_MMAP_THRESHOLD_": "65536"} if on_cpu() else {})
    scaling_file = work / "scaling.jsonl"
    scaling = [json.loads(line) for line in scaling_file.read_text().splitlines()] if scaling_file.exists() else []
    results = summarize(json.loads((work / "main.json").read_text()), json.loads((work / "memory.json").read_text()),
                        scaling, args, command.strip())
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (out / "bench.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
