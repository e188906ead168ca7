"""The paths `tools/gpu_check.sh` checks on a CUDA machine, one PASS/FAIL line each (issue 21).

    python -m benchmarks.gpu_check [--dry-run] [--out runs/gpu_check] [--budget-s 450]

Each path is commands run in order, then a verification of what they wrote. On a dry run (CPU, the test suite)
the launcher checks each launch's spec and overrides (`--dry-run`), inline checks run as they are, any other
command shows its `--help`, and nothing is verified: what can rot (names, arguments, specs) is exercised.
Writes OUT/gpu_check.md: the lines, the device and versions, and the benchmark's report when it ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DS = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
PRETRAIN = ["--module", "tcd_ds.cli.pretrain"]  # as `deepspeed` runs it


@dataclass
class CheckPath:
    name: str
    timeout_s: int
    commands: list[list[str]]
    verify: Callable[[], object] | None = None
    needs: list[str] = field(default_factory=list)  # paths whose outputs this one uses


def dry_form(command: list[str]) -> list[str]:
    """What a CPU checks of a command quickly: the launcher's validation of a launch's spec and overrides (a TCD
    student's without its teacher, which no dry run trains), an inline check as is, else --help."""
    module = next((m for m in (PRETRAIN[-1], "benchmarks.host_syncs") if m in command), None)
    if module is not None:
        rest = command[command.index(module) + 1:]
        args = [a for a in rest if not a.startswith(("--distill.", "--out="))]
        if len(args) < len([a for a in rest if not a.startswith("--out=")]):  # no teacher run to distil from
            args.append("--distill=null")
        return [PY, "-m", PRETRAIN[-1], *args, "--dry-run", "--world-size=1"]
    if command[1] == "-c":
        return command
    return command[:3 if command[1] == "-m" else 2] + ["--help"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trained(run: Path, steps: int) -> str:
    """`run` logged steps up to `steps`, every loss finite, a validation, and saved its step-`steps` checkpoint."""
    records = metrics(run)
    assert records[-1]["step"] == steps, [r["step"] for r in records]
    assert all(math.isfinite(r["loss/total" if "loss/total" in r else "loss/mlm"]) for r in records)
    assert any("val/loss/mlm" in r for r in records) and (run / "checkpoints" / f"step_{steps}").is_dir()
    return f"loss/mlm {records[0]['loss/mlm']:.3f} -> {records[-1]['loss/mlm']:.3f}"


def converted(out: Path) -> str:
    """Both converted models load as users load them (the teacher as plain BERT, the student through the Auto
    class with its shipped code) and give finite logits on the device."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = []
    for name, load in (("hf_teacher", BertForMaskedLM.from_pretrained),
                       ("hf_tcd", lambda d: AutoModelForMaskedLM.from_pretrained(d, trust_remote_code=True))):
        model = load(out / name).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(out / name, trust_remote_code=True)
        ids = tokenizer("A converted model reads text.", return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids.to(device)).logits
        assert torch.isfinite(logits).all(), name
        result.append(f"{name}: {type(model).__name__}")
    return ", ".join(result)


def sync_sites(out: Path) -> str:
    from benchmarks.host_syncs import unexpected

    steps = json.loads((out / "syncs.json").read_text())["steps"][1:]
    bad = unexpected(steps)
    assert not bad, f"unexpected waits in a step: {bad}"
    return f"per step: {steps[-1]}"


GROUPED_MM = """
import torch
from deepspeed.accelerator import get_accelerator
device = get_accelerator().device_name()
dtype = torch.bfloat16 if device == "cuda" else torch.float32
g = torch.Generator().manual_seed(0)
sizes = [0, 3, 13, 1, 40, 7, 0, 16]  # uneven: empty groups, sizes that are no multiple of 8
x = torch.randn(sum(sizes), 64, generator=g).to(device, dtype)
w = torch.randn(len(sizes), 64, 96, generator=g).to(device, dtype)
offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
got = torch._grouped_mm(x, w, offs=offs).float()
want = torch.cat([a.float() @ b.float() for a, b in zip(x.split(sizes), w)])
err = ((got - want).abs().max() / want.abs().max()).item()
assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err
print(f"_grouped_mm {dtype} vs per-group products, relative error {err:.1e}")
"""


def check_paths(out: Path, want: str) -> list[CheckPath]:
    teacher, tcd, cache = out / "teacher", out / "tcd", out / "cache"
    tiny = [f"--data.cache_dir={cache}", "--logging.progress_bar=False", "--logging.every=5", "--train.dtype=bf16",
            "--train.eval_every=10", "--checkpoint.every=10"]
    teacher_launch = [*DS, *PRETRAIN, "--spec", "teacher_tiny", f"--run_dir={teacher}", *tiny,
                      "--train.steps=20"]
    student = ["--spec", "student_tiny_tcd", *tiny, "--model.moe.ep_size=1",
               f"--distill.teacher={teacher}", "--distill.teacher_dtype=bf16"]
    tcd_launch = [*DS, *PRETRAIN, *student, f"--run_dir={tcd}", "--train.steps=20", "--train.steps_per_launch=10"]
    imports = ("import deepspeed, datasets, pydantic, torch, transformers, tcd_ds\n"
               "from deepspeed.accelerator import get_accelerator\n"
               f"name = get_accelerator().device_name(); assert name == {want!r}, name\n"
               "print(torch.__version__, deepspeed.__version__, transformers.__version__, name,\n"
               "      torch.cuda.get_device_name() if name == 'cuda' else '')")
    return [
        CheckPath("imports_and_accelerator", 120, [[PY, "-c", imports]]),
        CheckPath("teacher_bf16_nccl_zero2_validation_checkpoint", 150, [teacher_launch],
                  lambda: trained(teacher, 20)),
        CheckPath("tcd_student_bf16_teacher", 150, [tcd_launch], lambda: trained(tcd, 10), ["teacher_bf16"]),
        CheckPath("resume", 120, [tcd_launch], lambda: trained(tcd, 20), ["tcd_student"]),
        CheckPath("convert_bf16_shards", 120, [[PY, "-m", "tcd_ds.cli.convert", str(run), str(out / f"hf_{run.name}"),
                                                "--force"] for run in (teacher, tcd)],
                  lambda: converted(out), ["resume"]),
        CheckPath("probe_cuda", 90, [[PY, "-m", "tcd_ds.cli.probe", str(out / "hf_tcd"), "--seq_len=64",
                                      f"--cache_dir={cache}", f"--out={out / 'probe.json'}"]],
                  lambda: json.loads((out / "probe.json").read_text()), ["convert"]),
        CheckPath("finetune_cuda", 150, [[PY, "-m", "tcd_ds.cli.finetune", str(out / "hf_tcd"),
                                          "--task=movie_reviews", "--seeds=1", "--epochs=1", "--lr=1e-3",
                                          "--max_train_examples=256", f"--out={out / 'finetune.json'}"]],
                  lambda: json.loads((out / "finetune.json").read_text()), ["convert"]),
        CheckPath("sync_count_of_a_step", 120, [[PY, "-m", "benchmarks.host_syncs", *student,
                                                 f"--run_dir={out / 'syncs'}", "--train.steps=4",
                                                 f"--out={out / 'syncs.json'}"]],
                  lambda: sync_sites(out), ["teacher_bf16"]),
        CheckPath("grouped_mm_uneven_groups", 60, [[PY, "-c", GROUPED_MM]]),
        CheckPath("bench_small_dense_vs_64_experts", 240, [[PY, "-m", "benchmarks.bench", "--experts", "--preset",
                                                            "small", "--ranks", "1", "--rounds", "2",
                                                            f"--out={out / 'bench'}", f"--cache-dir={cache}"]],
                  lambda: (out / "bench" / "experts.md").read_text()),
    ]


def run_path(path: CheckPath, logs: Path, dry: bool, seconds_left: float) -> str:
    started = time.monotonic()
    log = logs / f"{path.name}.log"
    commands = [dry_form(c) for c in path.commands] if dry else path.commands
    with log.open("w") as f:
        for command in dict.fromkeys(map(tuple, commands)):  # a dry run checks the same form once
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            limit = min(path.timeout_s, seconds_left - (time.monotonic() - started))
            if limit < 5:
                return f"FAIL {path.name}: no time left in the budget"
            try:
                status = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                return f"FAIL {path.name}: timed out after {limit:.0f} s (log {log})"
            if status:
                return f"FAIL {path.name}: exit status {status}: {last_line(log)}"
    took = time.monotonic() - started
    try:
        detail = "" if dry or path.verify is None else str(path.verify()).splitlines()[0][:160]
    except Exception as e:  # noqa: BLE001 (any failed verification is this path's FAIL)
        return f"FAIL {path.name} ({took:.0f} s): {type(e).__name__}: {str(e)[:200]}"
    return f"PASS {path.name} ({took:.0f} s){': ' + detail if detail else ''}"


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on CPU: check that every path's commands parse")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    parser.add_argument("--budget-s", type=float, default=450, help="all paths together (the check's 8 minutes)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        os.environ.pop("DS_ACCELERATOR", None)  # a leftover CPU setting must not hide the GPU
    want = "cpu" if args.dry_run else "cuda"
    start, lines, failed = time.monotonic(), [], set()
    for path in check_paths(out, want):
        if any(need in name for need in path.needs for name in failed):
            line = f"FAIL {path.name}: skipped, it needs {', '.join(path.needs)}"
        else:
            line = run_path(path, logs, args.dry_run, args.budget_s - (time.monotonic() - start))
        if line.startswith("FAIL"):
            failed.add(path.name)
        print(line, flush=True)
        lines.append(line)
    bench = out / "bench" / "experts.md"
    report = ["# tools/gpu_check.sh" + (" --dry-run" if args.dry_run else ""), "", *[f"    {line}" for line in lines]]
    if bench.is_file() and not args.dry_run:
        report += ["", bench.read_text()]
    (out / "gpu_check.md").write_text("\n".join(report) + "\n")
    took = time.monotonic() - start
    print(f"{len(lines) - len(failed)}/{len(lines)} paths passed in {took:.0f} s; {out}/gpu_check.md")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
