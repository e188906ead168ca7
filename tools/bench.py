"""Benchmarks of the training steps, side by side on the same shapes in one run (issue 8).

    DS_ACCELERATOR=cpu python tools/bench.py [--out bench_out] [--ranks 2] [--rounds 5] [--steps 2] [--quick]

Measures, on the demo shapes (ds_configs/*_demo*.yaml; --quick: the tiny test shapes, a couple of steps):
our dense step against what a user would write (HF `BertForMaskedLM`, `torch.optim.AdamW`, DDP); the MoE
step with MLM only against the full TCD step, with a per-phase breakdown; achieved model FLOP/s against an
fp32 matrix-product peak measured in the same processes; peak memory per rank; the relation losses' cost as N
grows, local against global scope; and one rank against `--ranks` ranks at a fixed per-rank batch.

Each step is the real one: components are built by `Trainer` from a run spec and stepped by its
`DistillationEngine`. Timings on a shared machine are noisy, so variants are interleaved round after round in
the same processes (the order rotating), each ratio is taken within a round, and medians over rounds are
reported. Writes OUT/bench.json and OUT/bench.md, and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
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
TARGETS = {  # name: (metric key, bound, "max" if the value must stay at or below the bound else "min")
    "TCD step / MoE MLM-only step": ("tcd_over_moe", 1.40, "max"),
    "dense tokens/s / HF baseline tokens/s": ("dense_over_hf", 1.5, "min"),
    "relation losses / TCD step": ("relation_share", 0.05, "max"),
    "MFU, dense step": ("mfu_dense", 0.50, "min"),
    "MFU, MoE step": ("mfu_moe", 0.50, "min"),
    "MFU, TCD step": ("mfu_tcd", 0.50, "min"),
    "N ranks / 1 rank tokens/s, TCD step": ("scaling_tcd", 1.8, "min"),
}
Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- measuring


def sync() -> None:
    get_accelerator().synchronize()


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Seconds per call, ranks started together; the device is drained before and after."""
    dist.barrier()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def matmul_rate(m: int, k: int, n: int, device: torch.device, budget_s: float) -> float:
    """fp32 FLOP/s of an [m, k] @ [k, n] product, repeated for about `budget_s`."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    one = timed(lambda: a @ b)
    return 2 * m * k * n / timed(lambda: a @ b, max(1, int(budget_s / max(one, 1e-6))))


def matmul_peaks(device: torch.device, tokens: int, hidden: int, intermediate: int, budget_s: float) -> dict:
    """The peak (best square product) and, to tell shape from load, the model's own FFN and projection
    products; measured in the ranks' processes, under the same load as the steps."""
    sizes = (256, 512, 1024) if device.type == "cpu" else (4096, 8192)
    return {
        "square": max(matmul_rate(n, n, n, device, budget_s / 5) for n in sizes),
        "ffn": matmul_rate(tokens, hidden, intermediate, device, budget_s / 5),
        "projection": matmul_rate(tokens, hidden, hidden, device, budget_s / 5),
    }


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def memory_now() -> int:
    """Bytes in use: the accelerator allocator's, or on CPU (Linux) the process's resident set."""
    return _proc_status("VmRSS") if on_cpu() else int(get_accelerator().memory_allocated())


def reset_peak_memory() -> None:
    if on_cpu():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to VmRSS
    else:
        get_accelerator().reset_peak_memory_stats()


def peak_memory() -> int:
    return _proc_status("VmHWM") if on_cpu() else int(get_accelerator().max_memory_allocated())


def step_memory(fn: Callable[[], object]) -> int:
    """Bytes a call needs beyond what is resident before it (activations, gradients' buffers, messages)."""
    dist.barrier()
    reset_peak_memory()
    before = memory_now()
    fn()
    sync()
    return peak_memory() - before


@contextmanager
def phase_timers(seconds: dict[str, float], calls: dict[str, tuple[object, str]]):
    """Wrap the named methods of the step's own objects so each call is drained and timed (instrumented runs
    only: the draining serialises what would overlap)."""
    for name, (obj, attr) in calls.items():
        original = getattr(obj, attr)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            sync()
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            sync()
            seconds[_name] += time.perf_counter() - start
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
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {"op": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
        for e in events[:count]
    ]


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


def run_spec(preset: str, kind: str, run_dir: Path, cache_dir: str, world: int, teacher: Path | None = None) -> RunSpec:
    """A preset's spec with one micro-batch per rank per step (a fixed per-rank batch whatever the world)."""
    dense, moe, tcd = PRESETS[preset]
    path = REPO / "ds_configs" / {"dense": dense, "moe": moe, "tcd": tcd}[kind]
    base = load_spec(path, [] if kind != "tcd" else [f"--distill.teacher={teacher}"])
    overrides = [
        f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}",
        f"--train.global_batch_size={base.train.micro_batch_size * world}", "--train.steps=100000",
        "--logging.progress_bar=False", "--logging.wandb.enabled=False",
    ]
    if kind != "dense":
        overrides.append(f"--model.moe.ep_size={math.gcd(base.model.moe.ep_size, world)}")
    if kind == "tcd":
        overrides.append(f"--distill.teacher={teacher}")
    return load_spec(path, overrides)


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
    draws = iter(range(10**9))

    def run() -> None:
        generator = seeded_generator(0, "bench", next(draws), dist.get_rank())
        distiller.weighted_sum(distiller(student, teacher, mask, generator)).backward()

    return run


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


def rounds_of(variants: dict[str, Callable], rounds: int, steps: int, cpu_share: dict | None = None) -> dict:
    """Seconds per call of each variant in each round (order rotating across rounds, after a warm-up call),
    the slowest rank's: a data-parallel step ends when every rank's has. `cpu_share` gets, per variant, the
    share of a core each rank's process had meanwhile (its CPU time over wall time; on a shared machine, below
    1 where other processes took the core)."""
    for fn in variants.values():
        fn()
    names, seconds, shares = list(variants), defaultdict(list), defaultdict(list)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            cpu = time.process_time()
            seconds[name].append(timed(variants[name], steps))
            shares[name].append((time.process_time() - cpu) / (seconds[name][-1] * steps))
    ranks = every_rank((dict(seconds), dict(shares)))
    if cpu_share is not None:
        cpu_share.update({name: [statistics.median(rank[1][name]) for rank in ranks] for name in names})
    return {name: [max(values) for values in zip(*(rank[0][name] for rank in ranks))] for name in names}


def build(kind: str, cfg: dict, world: int, run_dir: Path, teacher: Path | None = None) -> Trainer:
    return Trainer(run_spec(cfg["preset"], kind, run_dir, cfg["cache_dir"], world, teacher))


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


def phase_breakdown(trainer: Trainer, batches: list[list[Batch]], steps: int) -> dict[str, float]:
    """Seconds per step in each phase of the real step, each call drained and timed."""
    calls = {"teacher forward": (trainer.distillation, "teacher_forward"),
             "student forward": (trainer.engine, "forward"),
             "relation losses (forward)": (trainer.distillation, "relation_losses"),
             "backward (student and relations)": (trainer.engine, "backward"),
             "optimizer step": (trainer.engine, "step")}
    calls = {name: call for name, call in calls.items() if call[0] is not None}
    phases: dict[str, float] = defaultdict(float)
    with phase_timers(phases, calls):
        total = timed(engine_stepper(trainer, batches), steps)
    phases = {name: seconds / steps for name, seconds in phases.items()}
    return {**phases, "other": total - sum(phases.values()), "total": total}


def main_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Everything but the 1-rank comparison, in one world of `world` ranks."""
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
    cpu_share: dict[str, list[float]] = {}
    seconds = rounds_of(variants, cfg["rounds"], cfg["steps"], cpu_share)
    for kind in ("square", "ffn", "projection"):  # the mean over ranks; the first call was the warm-up
        seconds[f"matmul_{kind}_flops"] = [statistics.mean(p[kind] for p in ranks)
                                           for ranks in zip(*every_rank(peaks[1:]))]

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
            "seconds": seconds, "flops_per_step_per_rank": flops, "breakdown": breakdown,
            "relation_seconds": relation_seconds, "profiles": profiles, "sync_sites": syncs, "cpu_share": cpu_share,
            "load_average": os.getloadavg(),
        }
        (work / "main.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def scaling_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Steps at a fixed per-rank batch in a world of `world` ranks, for the 1-rank comparison."""
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    trainers = {kind: build(kind, cfg, world, work / f"scale{world}_{kind}", teacher=work / "teacher")
                for kind in ("dense", "moe", "tcd")}
    batches = [trainers["dense"].train_batches.micro_batches(s) for s in range(4)]
    cpu_share: dict[str, list[float]] = {}
    seconds = rounds_of({kind: engine_stepper(t, batches) for kind, t in trainers.items()},
                        cfg["scaling_blocks"], cfg["steps"], cpu_share)
    if rank == 0:
        with (work / "scaling.jsonl").open("a") as f:
            f.write(json.dumps({"world_size": world, "seconds": seconds, "cpu_share": cpu_share,
                                "load_average": os.getloadavg()}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def memory_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Per rank: the floor (interpreter, libraries, process group); the state each variant holds after its
    first step (model, gradients, optimizer state, the data pipeline for the first built); what a step needs on
    top of it. On CPU the launch runs with glibc's mmap threshold low, so that freed tensors leave the resident
    set at once and it tracks the live bytes."""
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    floor, state, step, batches = memory_now(), {}, {}, None
    for kind in ("dense", "moe", "tcd", "hf"):
        before = memory_now()
        if kind == "hf":
            hf = HFBaseline(dense.spec, dense.model, dense.engine.device)
            stepper = Stepper(lambda mb, s: hf.step(mb[0]), batches, 0, rank)
        else:
            trainer = build(kind, cfg, world, work / f"memory_{kind}", teacher=work / "teacher")
            dense = trainer if kind == "dense" else dense
            batches = batches or [trainer.train_batches.micro_batches(s) for s in range(2)]
            stepper = engine_stepper(trainer, batches)
        stepper()  # the first step allocates the optimizer's state
        state[kind] = memory_now() - before
        step[kind] = step_memory(stepper)
    memory = {"floor": every_rank(floor), "state": every_rank(state), "step": every_rank(step)}
    if rank == 0:
        (work / "memory.json").write_text(json.dumps(memory))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, world: int, cfg: dict, env: dict[str, str] | None = None) -> None:
    """`fn(rank, world, port, cfg)` on `world` fresh processes, with `env` added to their environment."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        mp.spawn(fn, args=(world, free_port(), cfg), nprocs=world, join=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------- report

STEP_NAMES = {"hf": "HF BertForMaskedLM + torch AdamW (DDP)", "dense_full_head": "ours, dense, full MLM head",
              "dense": "ours, dense", "moe": "ours, MoE, MLM only", "tcd": "ours, MoE + TCD"}


def spread(values: list[float], best: float) -> dict:
    """`best`: the same ratio of each side's best time, an estimate that ignores time lost to other processes."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "best": best,
            "rounds": values}


def summarize(main: dict, scaling: list[dict], args: argparse.Namespace, command: str) -> dict:
    """Ratios within each round (then their median over rounds), and per step the median seconds."""
    s, flops = main["seconds"], main["flops_per_step_per_rank"]
    world, tokens, rounds = main["world_size"], main["tokens_per_rank_per_step"], range(len(s["dense"]))

    def ratio(a: str, b: str) -> tuple[list[float], float]:
        return [s[a][r] / s[b][r] for r in rounds], min(s[a]) / min(s[b])

    peak = s["matmul_square_flops"]
    measured = {
        "tcd_over_moe": ratio("tcd", "moe"),
        "dense_over_hf": ratio("hf", "dense"),
        "relation_share": ratio("relations", "tcd"),
        **{f"mfu_{v}": ([flops[v] / s[v][r] / peak[r] for r in rounds], flops[v] / min(s[v]) / max(peak))
           for v in STEP_NAMES},
        "masked_head_speedup": ratio("dense_full_head", "dense"),
        "teacher_cut_speedup": ratio("teacher_full", "teacher_cut"),
        **{f"{kind}_matmul_over_peak": ([s[f"matmul_{kind}_flops"][r] / peak[r] for r in rounds],
                                        max(s[f"matmul_{kind}_flops"]) / max(peak)) for kind in ("ffn", "projection")},
    }
    pairs = list(zip(scaling[0::2], scaling[1::2]))  # launches alternate: 1 rank, then `world` ranks
    for kind in ("dense", "moe", "tcd") if pairs else ():
        # Tokens/s at a fixed per-rank batch: world * t(1 rank) / t(world ranks), per pair of adjacent launches.
        one = [t for record in scaling if record["world_size"] == 1 for t in record["seconds"][kind]]
        many = [t for record in scaling if record["world_size"] == world for t in record["seconds"][kind]]
        measured[f"scaling_{kind}"] = (
            [world * statistics.median(a["seconds"][kind]) / statistics.median(b["seconds"][kind]) for a, b in pairs],
            world * min(one) / min(many),
        )
    ratios = {name: spread(*values) for name, values in measured.items()}
    targets = []
    for name, (key, bound, kind) in TARGETS.items():
        value = ratios[key]["median"] if key in ratios else None
        met = None if value is None else (value <= bound if kind == "max" else value >= bound)
        targets.append({"target": name, "key": key, "bound": bound, "kind": kind, "value": value, "met": met})
    steps = {}
    for v in STEP_NAMES:
        t = statistics.median(s[v])
        steps[v] = {"seconds": t, "tokens_per_s": world * tokens / t, "model_flops_per_s_per_rank": flops[v] / t}
    mib = {part: [{k: b / 2**20 for k, b in rank.items()} if isinstance(rank, dict) else rank / 2**20
                  for rank in ranks] for part, ranks in main["memory"].items()}
    return {
        "command": command, "preset": "quick" if args.quick else "demo", "device": get_accelerator().device_name(),
        "world_size": world, "threads_per_rank": args.threads, "torch": torch.__version__,
        "rounds": args.rounds, "steps_per_round": args.steps, "tokens_per_rank_per_step": tokens,
        "masked_tokens_per_rank_per_step": main["masked_tokens_per_rank_per_step"], "shapes": main["shapes"],
        "hf_attn_implementation": main["hf_attn_implementation"], "teacher_layers": main["teacher_layers"],
        "mlm_loss_check": main["mlm_loss_check"], "targets": targets, "ratios": ratios, "steps": steps,
        "matmul_peak_flops_per_rank": statistics.median(s["matmul_square_flops"]),
        "breakdown": main["breakdown"], "memory_mib": mib,
        "relations_ms": {key: 1e3 * statistics.median(v) for key, v in main["relation_seconds"].items()},
        "seconds": s, "flops_per_step_per_rank": flops, "scaling": scaling, "profiles": main["profiles"],
        "sync_sites": main["sync_sites"], "cpu_share": main["cpu_share"], "load_average": main["load_average"],
    }


def verdict(t: dict) -> str:
    if t["value"] is None:
        return "not measured (needs more than one rank)"
    off = 100 * (t["value"] / t["bound"] - 1)
    return f"{'met' if t['met'] else '**missed**'} ({off:+.0f}% against the bound)"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(r: dict) -> str:
    ratio = lambda q: f"{q['median']:.3f} ({q['min']:.3f} to {q['max']:.3f})"  # noqa: E731
    lines = [f"Command: `{r['command']}`", "",
             f"{r['device']}, {r['world_size']} ranks x {r['threads_per_rank']} thread(s), torch {r['torch']}; "
             f"{r['tokens_per_rank_per_step']} tokens per rank per step ({r['masked_tokens_per_rank_per_step']:.0f} "
             f"masked); {r['rounds']} interleaved rounds x {r['steps_per_round']} step(s); ratios taken within a "
             f"round, medians (min to max) over rounds; \"best\": the ratio of each side's best time. Measured "
             f"fp32 matrix-product peak: {r['matmul_peak_flops_per_rank'] / 1e9:.1f} GFLOP/s per rank. Load "
             f"average at the end: {r['load_average'][0]:.1f}.", ""]
    best = lambda key: f"{r['ratios'][key]['best']:.3f}" if key in r["ratios"] else "-"  # noqa: E731
    lines += table(["target", "bound", "measured", "best", "verdict"], [
        [t["target"], f"{'<=' if t['kind'] == 'max' else '>='} {t['bound']}",
         ratio(r["ratios"][t["key"]]) if t["key"] in r["ratios"] else "-", best(t["key"]), verdict(t)]
        for t in r["targets"]])
    lines += [""] + table(["step", "s/step", "tokens/s, all ranks", "model GFLOP/s per rank", "MFU",
                           "core share per rank"], [
        [STEP_NAMES[v], f"{st['seconds']:.3f}", f"{st['tokens_per_s']:.0f}",
         f"{st['model_flops_per_s_per_rank'] / 1e9:.1f}", f"{100 * r['ratios'][f'mfu_{v}']['median']:.0f}%",
         " / ".join(f"{c:.2f}" for c in r["cpu_share"][v])]
        for v, st in r["steps"].items()])
    others = ("masked_head_speedup", "teacher_cut_speedup", "ffn_matmul_over_peak", "projection_matmul_over_peak",
              "scaling_dense", "scaling_moe")
    lines += [""] + table(["other ratio", "measured", "best"],
                          [[k, ratio(r["ratios"][k]), best(k)] for k in others if k in r["ratios"]])
    for name, phases in r["breakdown"].items():
        lines += ["", f"Phases of the {name} step (instrumented: each call drained and timed):", ""]
        lines += table(["phase", "ms", "share"], [[k, f"{1e3 * v:.1f}", f"{100 * v / phases['total']:.0f}%"]
                                                  for k, v in phases.items()])
    ns = sorted({int(key.split("/")[0]) for key in r["relations_ms"]})
    lines += ["", "Relation losses alone, forward + backward, ms per call:", ""]
    lines += table(["scope"] + [f"N={n}" for n in ns],
                   [[scope] + [f"{r['relations_ms'][f'{n}/{scope}']:.2f}" for n in ns] for scope in ("local", "global")])
    mem = r["memory_mib"]
    lines += ["", "Memory per rank, MiB (rank 0 / rank 1 ...): the state each variant holds after its first step "
              "(the dense one includes the data pipeline), and what a step needs on top of it:", ""]
    lines += table(["", "hf", "dense", "moe", "tcd"], [
        ["state"] + [" / ".join(f"{rank[v]:.0f}" for rank in mem["state"]) for v in ("hf", "dense", "moe", "tcd")],
        ["step"] + [" / ".join(f"{rank[v]:.0f}" for rank in mem["step"]) for v in ("hf", "dense", "moe", "tcd")],
    ])
    lines.append(f"\nFloor: {' / '.join(f'{m:.0f}' for m in mem['floor'])} MiB.")
    if r["scaling"]:
        lines += ["", "Scaling launches in the order run (fixed per-rank batch): ms per step, median over blocks; "
                  "the TCD step's core share per rank; the load average:", ""]
        lines += table(["ranks", "dense", "moe", "tcd", "core share, tcd", "load"], [
            [rec["world_size"]] + [f"{1e3 * statistics.median(rec['seconds'][k]):.0f}" for k in ("dense", "moe", "tcd")]
            + [" / ".join(f"{c:.2f}" for c in rec["cpu_share"]["tcd"]), f"{rec['load_average'][0]:.1f}"]
            for rec in r["scaling"]])
    for name, ops in r["profiles"].items():
        lines += ["", f"Profile of one {name} step, rank 0, top ops by self time:", ""]
        lines += table(["op", "ms", "share", "calls"],
                       [[f"`{o['op']}`", f"{o['ms']:.1f}", f"{100 * o['share']:.0f}%", o["calls"]] for o in ops])
    if any(v is not None for v in r["sync_sites"].values()):
        lines += ["", f"Host-device syncs in one step (file:line): {json.dumps(r['sync_sites'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md and work files")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the main world (capped at the devices)")
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per variant per round")
    parser.add_argument("--scaling-rounds", type=int, default=2, help="interleaved (1 rank, N ranks) launch pairs")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "tcd_ds"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a couple of steps: checks it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.scaling_rounds = 2, 1, 1
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
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
        "scaling_blocks": 2 if args.quick else 4,
    }
    spawn(main_world, args.ranks, cfg)
    if args.ranks > 1:
        for _ in range(args.scaling_rounds):
            spawn(scaling_world, 1, cfg)
            spawn(scaling_world, args.ranks, cfg)
    spawn(memory_world, args.ranks, cfg, env={"MALLOC_MMAP_THRESHOLD_": "65536"} if accelerator.device_name() == "cpu" else {})
    main_results = json.loads((work / "main.json").read_text())
    main_results["memory"] = json.loads((work / "memory.json").read_text())
    scaling = [json.loads(line) for line in (work / "scaling.jsonl").read_text().splitlines()] if args.ranks > 1 else []
    command = "DS_ACCELERATOR=cpu " * (accelerator.device_name() == "cpu") + "python tools/bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    results = summarize(main_results, scaling, args, command.strip())
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (out / "bench.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
