"""Launch a small multi-rank run N times and count the launches that printed `[tcd-ds] finished` yet exited
non-zero: a run that finished must exit 0 every time (sweep agents, the protocol and Slurm read the status).

    python -m benchmarks.launch_loop --launches 50 [--ranks 2] [--spec teacher_tiny] [--cores] \
        [--out runs/launch_loop] [-- --train.steps=4 ...]

Each launch goes through the `deepspeed` runner as a user's does, with a fresh run dir and one shared data
cache (the tokenizer and blocks are built once), on CPU ranks unless DS_ACCELERATOR says otherwise. The output
of every failed launch is kept in OUT/failed_NNN.log. `--cores` lets the ranks dump core (where the kernel's
core_pattern says; `core` means the repository root, the ranks' working directory) for `gdb python CORE`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tcd_ds.train.launch import deepspeed_command

REPO = Path(__file__).resolve().parents[1]
FINISHED = "[tcd-ds] finished"
TINY = ["--train.steps=2", "--train.eval_every=2", "--train.eval_batches=1", "--checkpoint.every=2",
        "--logging.every=1", "--logging.progress_bar=False"]


def allow_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def launch(i: int, args: argparse.Namespace, extra: list[str], env: dict) -> dict:
    work = args.out / f"launch_{i:03d}"
    work.mkdir(parents=True, exist_ok=True)
    command = deepspeed_command(["--num_gpus", str(args.ranks)], args.spec,
                                [f"--run_dir={work / 'run'}", f"--data.cache_dir={args.out / 'cache'}", *TINY, *extra])
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          preexec_fn=allow_cores if args.cores else None)
    output = proc.stdout + proc.stderr
    result = {"launch": i, "rc": proc.returncode, "finished": FINISHED in output,
              "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        (args.out / f"failed_{i:03d}.log").write_text(" ".join(command) + "\n\n" + output)
    shutil.rmtree(work / "run", ignore_errors=True)
    if not any(work.iterdir()):
        work.rmdir()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--spec", default="teacher_tiny", help="a run spec: a path or a shipped name")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "launch_loop")
    parser.add_argument("--cores", action="store_true", help="let the ranks dump core")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **os.environ}
    results = []
    with open(args.out / "launches.jsonl", "a") as log:
        for i in range(args.launches):
            results.append(launch(i, args, extra, env))
            log.write(json.dumps(results[-1]) + "\n")
            log.flush()
            r = results[-1]
            print(f"launch {i + 1}/{args.launches}: exit {r['rc']}, {'finished' if r['finished'] else 'NOT finished'}"
                  f", {r['seconds']} s", flush=True)
    finished = [r for r in results if r["finished"]]
    bad = [r for r in finished if r["rc"] != 0]
    unfinished = len(results) - len(finished)
    print(f"{len(results)} launches: {len(finished)} finished, {len(bad)} of them exited non-zero "
          f"(launches {[r['launch'] for r in bad]}); {unfinished} did not finish. Logs of failures: {args.out}")
    return 1 if bad or unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
