"""Benchmarks of the training steps, side by side on the same shapes in one run (issue 8).

    DS_ACCELERATOR=cpu python -m benchmarks.bench [--out runs/bench] [--ranks 2] [--rounds 8] [--quick] [--experts]
                                                  [--micro-batch N]

Measures, on the demo shapes (tcd_ds/presets/*_demo*.yaml; --quick: the tiny test shapes, a couple of steps): our
dense step against what a user would write (HF `BertForMaskedLM`, `torch.optim.AdamW`, DDP); the MoE step with
MLM only against the full TCD step, with a per-phase breakdown; achieved model FLOP/s against an fp32
matrix-product peak measured in the same processes; memory per rank; the relation losses' cost as N grows,
local against global scope; one rank against `--ranks` ranks at a fixed per-rank batch; a profile of each step.
`--experts` runs the expert-count comparison alone instead (issues 13, 23: dense, 8 and 64 experts, 64 with the
former per-forward copy of the expert weights, 8 and 64 with the experts on the capacity-padded buffers; the MoE
forwards split into gate, dispatch, all-to-all, experts and combine; the MoE layers' activation bytes and
weight-shaped tensors per micro-batch; OUT/experts.*);
`--micro-batch N` sets the sequences per rank per step (e.g. 64, for 64 x 128 tokens per rank).

Each step is the real one: components are built by `Trainer` from a run spec and stepped by its
`TrainStep`. On a machine shared with other work, timings are noisy: variants are interleaved round
after round in the same processes (the order rotating), ratios are taken within a round and their median over
rounds reported. On CPU every time is also taken as the ranks' CPU time, which leaves out time lost waiting
for a core (and for the other ranks). Writes OUT/bench.json and OUT/bench.md, and prints the markdown.

This file runs the launches (the worlds below) and writes the outputs; `benchmarks.measure` says how things are
measured, `benchmarks.variants` what is compared (its `VARIANT_SETS`), `benchmarks.report` how results are shown.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing.util
import os
import shutil
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable

import deepspeed.comm as dist
import torch
import torch.multiprocessing as mp
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger
from transformers import BertForMaskedLM

from benchmarks.measure import (clocks, every_rank, forward_flops, matmul_peaks, memory_now, on_cpu,
                           parameter_memory, rounds_of, step_memory, sync_sites, top_ops)
from benchmarks.report import experts_markdown, markdown, summarize, summarize_experts
from benchmarks.variants import (REPO, VARIANT_SETS, Builds, HFBaseline, Stepper, captures_of, full_head_step,
                                 mlm_loss_check, moe_memory, moe_split, phase_breakdown, relation_bench, to_device)
from tcd_ds.data.mlm import IGNORE_INDEX
from tcd_ds.distill.relations import RelationDistiller
from tcd_ds.train.launch import free_port

# ---------------------------------------------------------------------------------------------- ranks


def init_rank(rank: int, world: int, port: int, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logger.setLevel(logging.WARNING)


def end_world() -> None:
    """A world's processes end here, once every rank is done, without tearing the process group down: a DDP
    reducer (the HF baseline's) freed after its gloo group is destroyed can deadlock in the group's destructor,
    and the results are already on disk. multiprocessing's own exit work still runs (it releases semaphores).
    The bench's only private calls, both of the standard library: there is no public way to run that exit work
    and then leave without the interpreter's teardown."""
    dist.barrier()
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, world: int, cfg: dict, env: dict[str, str] | None = None) -> None:
    """`fn(rank, world, port, cfg)` on `world` fresh processes, with `env` added to their environment."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        mp.spawn(fn, args=(world, free_port(), cfg), nprocs=world, join=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------- worlds


def main_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Everything but the 1-rank comparison and the memory, in one world of `world` ranks."""
    init_rank(rank, world, port, cfg["threads"])
    work = Path(cfg["work"])
    builds = Builds(cfg, world, rank)
    dense = builds.trainer("dense", name="teacher")
    # The teacher, a checkpoint of this run dir: timings do not depend on its weights.
    dense.checkpointer.save(0, dense.checkpoint_state(0))
    moe, tcd = builds.trainer("moe"), builds.trainer("tcd")
    device, config = dense.engine.device, dense.model.config
    hf = HFBaseline(dense.spec, dense.model, device)
    batches = builds.batches
    assert all(len(b) == 1 for b in batches)  # one micro-batch per rank per step
    first = batches[0][0]
    losses = mlm_loss_check(dense, moe, hf, first)

    # The teacher as it would be without the cut: every layer, and the MLM head at every token.
    full_teacher = BertForMaskedLM(config).to(device).eval().requires_grad_(False)
    full_teacher.load_state_dict(dense.model.state_dict())
    on_device, captures = to_device(first, device), captures_of(tcd, first)
    distillation = tcd.train_step.tcd
    seed, peaks = dense.spec.seed, []
    variants = {
        "peak": lambda: peaks.append(matmul_peaks(device, first["input_ids"].numel(), config.hidden_size,
                                                  config.intermediate_size, cfg["peak_budget_s"])),
        "hf": Stepper(hf.step, batches, seed, rank),
        "dense_full_head": Stepper(lambda mb, s: full_head_step(dense, mb), batches, seed, rank),
        "dense": builds.stepper("dense", name="teacher"),
        "moe": builds.stepper("moe"),
        "tcd": builds.stepper("tcd"),
        "teacher_full": torch.no_grad()(
            lambda: full_teacher(on_device["input_ids"], on_device.get("attention_mask"))),
        "teacher_cut": lambda: distillation.teacher_forward(on_device),
        "relations": relation_bench(distillation.distiller, captures, first.get("attention_mask")),
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
            distiller = RelationDistiller(spec, distillation.distiller.plan, config.num_attention_heads)
            scan[f"{n}/{scope}"] = relation_bench(distiller, captures, first.get("attention_mask"))
    relation_seconds = rounds_of(scan, cfg["rounds"], 3)
    profiles = {name: top_ops(variants[name]) for name in ("hf", "dense", "moe", "tcd")}
    syncs = {name: sync_sites(variants[name]) for name in ("dense", "moe", "tcd")}

    if rank == 0:
        masked = statistics.mean(int((mb[0]["labels"] != IGNORE_INDEX).sum()) for mb in batches)
        batch, seq_len = first["input_ids"].shape
        tokens, moe_config = batch * seq_len, tcd.model.config
        layers = distillation.distiller.plan.layers_needed()
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


def timing_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Steps of the variant set `cfg["set"]` in a world of `world` ranks, interleaved in blocks; rank 0 appends
    a record to WORK/SET.timing.jsonl (the scaling comparison: launches of 1 and of N ranks alternate)."""
    init_rank(rank, world, port, cfg["threads"])
    name = cfg["set"]
    builds = Builds(cfg, world, rank, prefix=f"{name}{world}_")
    steppers = {variant: make() for variant, make in VARIANT_SETS[name](builds).items()}
    seconds = rounds_of(steppers, cfg["scaling_blocks"], cfg["steps"])
    if rank == 0:
        with (Path(cfg["work"]) / f"{name}.timing.jsonl").open("a") as f:
            f.write(json.dumps({"world_size": world, "seconds": seconds, "load_average": os.getloadavg()}) + "\n")
    end_world()


def memory_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """Per rank, for the variant set `cfg["set"]`: the floor (interpreter, libraries, process group); the state
    each variant holds after its first step (model, gradients, optimizer state; the data pipeline for the first
    built); what a step needs on top of it. Rank 0 writes WORK/SET.memory.json. On CPU the launch runs with
    glibc's mmap threshold low, so that freed tensors leave the resident set at once and it tracks the live
    bytes."""
    init_rank(rank, world, port, cfg["threads"])
    name = cfg["set"]
    builds = Builds(cfg, world, rank, prefix=f"memory_{name}_", batch_steps=2)
    floor, state, step = memory_now(), {}, {}
    for variant, make in VARIANT_SETS[name](builds).items():
        before = memory_now()
        stepper = make()
        stepper()  # the first step allocates the optimizer's state
        state[variant] = memory_now() - before
        step[variant] = step_memory(stepper)
    memory = {"floor": every_rank(floor), "state": every_rank(state), "step": every_rank(step)}
    if rank == 0:
        (Path(cfg["work"]) / f"{name}.memory.json").write_text(json.dumps(memory))
    end_world()


def experts_world(rank: int, world: int, port: int, cfg: dict) -> None:
    """The expert-count comparison (variant set "experts", issue 13): interleaved steps, the phases of the
    dense and 64-expert steps, a profile of each step and each variant's parameter memory per rank. Rank 0
    writes WORK/experts.json."""
    init_rank(rank, world, port, cfg["threads"])
    builds = Builds(cfg, world, rank, prefix="experts_")
    steppers = {variant: make() for variant, make in VARIANT_SETS["experts"](builds).items()}
    seconds = rounds_of(steppers, cfg["rounds"], cfg["steps"])
    trainers = builds.trainers
    breakdown = {name: phase_breakdown(trainers[name], builds.batches, cfg["rounds"]) for name in ("dense", "moe64")}
    moe = [name for name in trainers if name != "dense"]
    split = {name: moe_split(trainers[name], builds.batches, cfg["rounds"]) for name in moe}
    moe_bytes = {name: moe_memory(trainers[name], builds.batches[0][0]) for name in moe}
    profiles = {name: top_ops(stepper) for name, stepper in steppers.items()}
    memory = every_rank({name: parameter_memory(t.model, t.engine.optimizer) for name, t in trainers.items()})
    if rank == 0:
        out = {"world_size": world, "tokens_per_rank_per_step": builds.batches[0][0]["input_ids"].numel(),
               "seconds": seconds, "breakdown": breakdown, "profiles": profiles, "memory": memory,
               "moe_split": split, "moe_bytes": moe_bytes,
               "ep_size": {n: t.model.config.ep_size for n, t in trainers.items() if n != "dense"},
               "parameters": {n: sum(p.numel() for p in t.model.parameters()) for n, t in trainers.items()},
               "load_average": os.getloadavg()}
        (Path(cfg["work"]) / "experts.json").write_text(json.dumps(out))
    end_world()


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # on CPU: see `memory_world`


def run_all(args: argparse.Namespace, cfg: dict) -> tuple[dict, dict, list[dict]]:
    """The launches, in order; returns the main world's results, the memory and the scaling records. A new
    variant set is launched here with `timing_world` / `memory_world` and `{**cfg, "set": NAME}`."""
    work = Path(cfg["work"])
    spawn(main_world, args.ranks, cfg)
    for _ in range(args.scaling_rounds if args.ranks > 1 else 0):
        spawn(timing_world, 1, {**cfg, "set": "ours"})
        spawn(timing_world, args.ranks, {**cfg, "set": "ours"})
    spawn(memory_world, args.ranks, {**cfg, "set": "ours_and_hf"}, env=MEMORY_ENV if on_cpu() else {})
    scaling_file = work / "ours.timing.jsonl"
    scaling = [json.loads(line) for line in scaling_file.read_text().splitlines()] if scaling_file.exists() else []
    return (json.loads((work / "main.json").read_text()), json.loads((work / "ours_and_hf.memory.json").read_text()),
            scaling)


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
    parser.add_argument("--preset", choices=["quick", "demo", "small"], default=None,
                        help="the run specs' shapes (default: demo, quick with --quick)")
    parser.add_argument("--experts", action="store_true",
                        help="only the expert-count comparison (issues 13, 23): OUT/experts.json and OUT/experts.md")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per rank per step (default: the preset's micro-batch)")
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
    os.chdir(REPO)  # runs/ and .cache/ in the checkout
    cfg = {
        "work": str(work), "preset": args.preset or ("quick" if args.quick else "demo"), "cache_dir": args.cache_dir,
        "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
        "peak_budget_s": 0.1 if args.quick else 0.5, "relation_ns": [8, 16] if args.quick else [32, 64, 128, 256, 512],
        "scaling_blocks": 2 if args.quick else 4,
        "overrides": [f"--train.micro_batch_size={args.micro_batch}",  # one micro-batch per rank per step
                      f"--train.global_batch_size={args.micro_batch * args.ranks}",
                      "--train.eval_batches=1"] if args.micro_batch else [],  # the demo corpus' validation
    }
    command = ("DS_ACCELERATOR=cpu " * on_cpu() + "python -m benchmarks.bench " + " ".join(
        sys.argv[1:] if argv is None else argv)).strip()
    if args.experts:
        spawn(experts_world, args.ranks, cfg)
        name, results = "experts", summarize_experts(json.loads((work / "experts.json").read_text()), args, command)
        report = experts_markdown(results)
    else:
        name, results = "bench", summarize(*run_all(args, cfg), args, command)
        report = markdown(results)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
