"""DeepSpeed checkpoints under RUN_DIR/checkpoints/step_N, the newest named by DeepSpeed's `latest` file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import deepspeed.comm as dist

TAG = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step}"


def saved_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := TAG.match(p.name)) and p.is_dir())


def save(engine, run_dir: str | Path, step: int, keep_last: int, client_state: dict) -> None:
    """Save on every rank (ZeRO shards and experts are per rank), then prune the oldest on rank 0.
    DeepSpeed writes `latest` only after the tag is complete, so a save cut short leaves `latest` on the
    previous complete tag, which pruning never removes."""
    ckpt_dir = checkpoint_dir(run_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state={**client_state, "step": step})
    dist.barrier()
    if dist.get_rank() == 0:
        for old in saved_steps(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / tag_for(old), ignore_errors=True)
    dist.barrier()


def resume(engine, run_dir: str | Path) -> dict:
    """Load the latest checkpoint if there is one; its client state ({} for a fresh run)."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not (ckpt_dir / "latest").exists():
        return {}
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"could not load the checkpoint named by {ckpt_dir / 'latest'}")
    return client_state or {}
