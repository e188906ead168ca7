"""Benchmarks of the data path (issue 12): corpus preparation and batch building, side by side in one run.

    python -m benchmarks.bench_data [--out runs/bench_data] [--mb 100] [--big-mb 300] [--old-ref GIT_REF] [--quick]

Preparation: a corpus of `--mb` MB made from tcd_ds/bundled/wiki/train.txt (its lines repeated, each copy shuffled with
its own seed), tokenized and packed into blocks (seq_len 128, the demo tokenizer: 8000 pieces trained on the
bundled corpus) by `build_block_dataset`, each run in a fresh process on an empty block cache: with one
tokenizer thread per process (TOKENIZERS_PARALLELISM=false) at 1 and 2 processes, at the default settings at 1
and 2 processes, the default settings on a `--big-mb` corpus (memory growth), and `--old-ref`'s
`tcd_ds/data/blocks.py` (e.g. the commit before this path) at the default settings. Peak memory is the largest
sum of the process' and its workers' PSS (proportional set size: pages a forked worker shares with its parent
count once, as RSS would not), sampled every 200 ms.

Batches: `Trainer` on one CPU rank builds the demo MoE student (tcd_ds/presets/student_demo_moe.yaml, ep_size 1) at
micro-batch 16 x 128 and 32 x 128; a step is timed with its batches built on the training thread (exposed) and
prefetched on the background thread (`PrefetchingBatches`: only the wait is exposed), alternating round by
round. Writes OUT/bench_data.json and OUT/bench_data.md and prints the markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tcd_ds.resources import BUNDLED, PRESETS

REPO = Path(__file__).resolve().parents[1]

DEMO = PRESETS / "student_demo_moe.yaml"
SOURCE = BUNDLED / "wiki" / "train.txt"
OLD_TOKENS_PER_S = 0.95e6  # issue 12: the one-process path on 100 MB, default settings


def make_corpus(path: Path, megabytes: float) -> Path:
    """Repeat the bundled corpus' lines, each repetition in its own seeded order, up to `megabytes`."""
    if path.exists() and abs(path.stat().st_size - megabytes * 1e6) < 3e6:
        return path
    lines = SOURCE.read_text(encoding="utf-8").splitlines(keepends=True)
    size, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            order = lines[:]
            random.Random(copy).shuffle(order)
            text = "".join(order)
            f.write(text)
            size += len(text.encode())
            copy += 1
    return path


def demo_tokenizer(cache: Path):
    from tcd_ds.data.tokenizer import build_tokenizer

    return build_tokenizer([str(SOURCE)], 8000, str(cache))


# --- preparation: one configuration per fresh process --------------------------------------------------------

def prepare_child(config: dict) -> dict:
    """Runs in the child: one block build, timed, its peak RSS (process + workers) sampled."""
    import psutil

    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:  # PSS: forked workers share the parent's pages, which RSS would count once per process
                pss = me.memory_full_info().pss + sum(c.memory_full_info().pss for c in me.children(recursive=True))
            except psutil.Error:
                pss = 0
            peak[0] = max(peak[0], pss)
            stop.wait(0.2)

    tokenizer = demo_tokenizer(Path(config["cache"]))
    if config.get("old_blocks"):
        spec = importlib.util.spec_from_file_location("old_blocks", config["old_blocks"])
        blocks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(blocks)
        build = lambda out: blocks.build_block_dataset([config["corpus"]], tokenizer, 128, out)  # noqa: E731
    else:
        from tcd_ds.data.blocks import build_block_dataset

        build = lambda out: build_block_dataset(  # noqa: E731
            [config["corpus"]], tokenizer, 128, out, num_proc=config["num_proc"]
        )
    out = tempfile.mkdtemp(prefix="blocks.", dir=config["cache"])
    sampler = threading.Thread(target=sample, daemon=True)
    cpu0, started = os.times(), time.perf_counter()
    sampler.start()
    try:
        _, stats = build(out)
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        cpu1 = os.times()
        shutil.rmtree(out, ignore_errors=True)
    main_cpu, workers_cpu = sum(cpu1[:2]) - sum(cpu0[:2]), sum(cpu1[2:4]) - sum(cpu0[2:4])  # user + system
    cpu = main_cpu + workers_cpu
    maxrss = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"seconds": seconds, "tokens": stats["tokens"], "blocks": stats["blocks"], "tokens_per_s":
            stats["tokens"] / seconds, "peak_pss_mib": peak[0] / 2**20, "cpu_s": cpu, "main_cpu_s": main_cpu,
            "workers_cpu_s": workers_cpu, "cores_busy": cpu / seconds,
            "ru_maxrss_mib": [m / 1024 for m in maxrss]}


def run_prepare(config: dict, env_changes: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_changes}
    for key, value in env_changes.items():
        if value is None:
            env.pop(key)
    proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(config)], env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"preparation run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_prepare(args, work: Path) -> dict:
    cache = work / "cache"
    demo_tokenizer(cache)  # trained once, outside the timed runs
    corpus = str(make_corpus(work / f"corpus_{args.mb}mb.txt", args.mb))
    big = str(make_corpus(work / f"corpus_{args.big_mb}mb.txt", args.big_mb))
    one_thread, default = {"TOKENIZERS_PARALLELISM": "false"}, {"TOKENIZERS_PARALLELISM": None}
    runs = {
        "1 process, 1 thread": ({"num_proc": 1}, one_thread, corpus),
        "2 processes, 1 thread each": ({"num_proc": 2}, one_thread, corpus),
        "1 process, default settings": ({"num_proc": 1}, default, corpus),
        "2 processes, default settings": ({"num_proc": 2}, default, corpus),
    }
    if args.old_ref:
        old = work / "old_blocks.py"
        old.write_text(subprocess.run(["git", "show", f"{args.old_ref}:tcd_ds/data/blocks.py"], cwd=REPO,
                                      check=True, capture_output=True, text=True).stdout)
        runs[f"old path ({args.old_ref}), default settings"] = ({"old_blocks": str(old)}, default, corpus)
    runs[f"2 processes, default settings, {args.big_mb} MB"] = ({"num_proc": 2}, default, big)
    results = {}
    for name, (config, env, path) in runs.items():
        results[name] = run_prepare({**config, "cache": str(cache), "corpus": path}, env)
        results[name]["corpus_mb"] = os.path.getsize(path) / 1e6
        print(f"  {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    return results


# --- batches: exposed vs prefetched, on the real step ---------------------------------------------------------

def bench_batches(args, work: Path) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tcd_ds.spec import load_spec
    from tcd_ds.train.trainer import Trainer, seed_step

    results = {}
    for micro in args.micro_batches:
        spec = load_spec(DEMO, [f"--run_dir={work / f'run_{micro}'}", f"--data.cache_dir={work / 'cache'}",
                                "--model.moe.ep_size=1", f"--train.micro_batch_size={micro}",
                                f"--train.global_batch_size={micro}", "--logging.progress_bar=False"])
        trainer = Trainer(spec)  # the second one joins the process group the first started
        prefetched = trainer.train_batches
        plain = prefetched.batches
        times = {"exposed": [], "prefetched": []}
        steps = {"exposed": [], "prefetched": []}
        step = 0
        for round_ in range(args.rounds):
            for mode in (("exposed", "prefetched") if round_ % 2 else ("prefetched", "exposed")):
                source = plain if mode == "exposed" else prefetched
                for _ in range(args.steps + 1):
                    seed_step(spec.seed, step, 0)
                    t0 = time.perf_counter()
                    batches = source.micro_batches(step)
                    t1 = time.perf_counter()
                    trainer.train_step(batches, step)
                    t2 = time.perf_counter()
                    if _ > 0:  # a block's first step starts the prefetch chain (or follows the other mode)
                        times[mode].append(t1 - t0)
                        steps[mode].append(t2 - t0)
                    step += 1
        t0 = time.perf_counter()
        for s in range(20):
            plain.micro_batches(s)
        build_ms = (time.perf_counter() - t0) / 20 * 1e3
        results[f"{micro} x {spec.data.seq_len}"] = {
            "batch_build_ms": build_ms,
            **{f"{mode}_batch_ms": statistics.median(v) * 1e3 for mode, v in times.items()},
            **{f"{mode}_step_ms": statistics.median(v) * 1e3 for mode, v in steps.items()},
            **{f"{mode}_fraction": statistics.median(t / s for t, s in zip(times[mode], steps[mode]))
               for mode in times},
        }
        print(f"  batches {micro}: {json.dumps(results[f'{micro} x {spec.data.seq_len}'])}", file=sys.stderr,
              flush=True)
    return results


def markdown(prep: dict, batches: dict, conditions: str) -> str:
    lines = ["## Data preparation and batches (benchmarks/bench_data.py)", "", conditions, "",
             "| preparation run | corpus MB | tokens | wall s | tokens/s | CPU s (main + workers) | tokens per CPU s | "
             "cores busy | peak memory (PSS) MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in prep.items():
        split = f" ({r['main_cpu_s']:.1f} + {r['workers_cpu_s']:.1f})" if "main_cpu_s" in r else ""
        lines.append(f"| {name} | {r['corpus_mb']:.0f} | {r['tokens'] / 1e6:.1f}M | {r['seconds']:.1f} | "
                     f"{r['tokens_per_s'] / 1e6:.2f}M | {r['cpu_s']:.1f}{split} | "
                     f"{r['tokens'] / r['cpu_s'] / 1e6:.2f}M | "
                     f"{r['cores_busy']:.2f} | {r['peak_pss_mib']:.0f} |")
    lines += ["", "| batches (micro-batch) | build ms (on the thread) | exposed: batch ms / step ms (fraction) | "
              "prefetched: wait ms / step ms (fraction) |", "| --- | --- | --- | --- |"]
    for name, r in batches.items():
        lines.append(f"| {name} | {r['batch_build_ms']:.2f} | {r['exposed_batch_ms']:.2f} / {r['exposed_step_ms']:.0f}"
                     f" ({r['exposed_fraction']:.2%}) | {r['prefetched_batch_ms']:.3f} / "
                     f"{r['prefetched_step_ms']:.0f} ({r['prefetched_fraction']:.3%}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_data"))
    parser.add_argument("--work", default=None, help="corpora and caches (default: a temporary folder)")
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--big-mb", type=float, default=300)
    parser.add_argument("--old-ref", default=None, help="git revision whose tcd_ds/data/blocks.py to compare")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small corpora, few steps: checks that it runs")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(prepare_child(json.loads(args._child))))
        return
    args.micro_batches = (16, 32)
    if args.quick:
        args.mb, args.big_mb, args.steps, args.rounds = 3, 6, 2, 2
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data."))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    prep = bench_prepare(args, work)
    batches = bench_batches(args, work)
    load_end = os.getloadavg()
    import torch

    conditions = (f"{len(os.sched_getaffinity(0))} cores, load average {load[0]:.1f} at the start and "
                  f"{load_end[0]:.1f} at the end (1 min), torch {torch.__version__}, seq_len 128, vocabulary 8000.")
    md = markdown(prep, batches, conditions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_data.json").write_text(json.dumps({"preparation": prep, "batches": batches,
                                                     "conditions": conditions}, indent=1))
    (out / "bench_data.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
