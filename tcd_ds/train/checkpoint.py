"""Checkpoints under RUN_DIR/checkpoints/step_N that count only when complete.

DeepSpeed writes each rank's files into the tag directory; once every rank is done, rank 0 writes a manifest
(file names, sizes, sha256) into it, and only then points `latest` at it. A tag without a valid manifest (a
save cut short, a truncated file) is never resumed from and never counts towards `keep_last`, and pruning only
happens after the new manifest exists, so a failed save never costs the previous checkpoint. Assumes the run
directory is on storage all ranks share, as DeepSpeed's own loading does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import deepspeed.comm as dist

TAG = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(tag_dir: Path, layout: dict) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tag_dir.iterdir()) if p.name != MANIFEST}
    tmp = tag_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({**layout, "files": files}, indent=1))
    os.replace(tmp, tag_dir / MANIFEST)


def manifest_problem(tag_dir: Path) -> str | None:
    """Why `tag_dir` is not a complete checkpoint, or None if it is."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except json.JSONDecodeError:
        return "unreadable manifest"
    for name, expected in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
        if sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupt)"
    return None


def tag_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := TAG.match(p.name)) and p.is_dir())


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps whose tag has a manifest; cheap (no hashing): what pruning counts."""
    return [s for s in tag_steps(ckpt_dir) if (ckpt_dir / tag_for(s) / MANIFEST).is_file()]


def save(engine, run_dir: str | Path, step: int, keep_last: int, client_state: dict, layout: dict) -> None:
    """Every rank writes its part; rank 0 then seals the tag with a manifest, moves `latest`, and prunes."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag_dir = ckpt_dir / tag_for(step)
    if dist.get_rank() == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # the leftover of a save that did not finish, never a complete checkpoint
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state={**client_state, "step": step},
                           save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_manifest(tag_dir, {"step": step, **layout})
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag_for(step))
        os.replace(tmp, ckpt_dir / "latest")
        keep = set(complete_steps(ckpt_dir)[-keep_last:])
        for old in tag_steps(ckpt_dir):
            if old < step and old not in keep:
                shutil.rmtree(ckpt_dir / tag_for(old), ignore_errors=True)
    dist.barrier()


@dataclass
class Resumable:
    step: int
    layout: dict  # the world size and ep_size that wrote it


def newest_complete(run_dir: str | Path, log=print) -> Resumable | None:
    """The newest checkpoint that verifies against its manifest, reporting each newer one it skips."""
    ckpt_dir = checkpoint_dir(run_dir)
    for step in reversed(tag_steps(ckpt_dir)):
        problem = manifest_problem(ckpt_dir / tag_for(step))
        if problem is None:
            manifest = json.loads((ckpt_dir / tag_for(step) / MANIFEST).read_text())
            return Resumable(step, {k: v for k, v in manifest.items() if k not in ("files", "step")})
        log(f"[tcd-ds] skipping checkpoint {ckpt_dir / tag_for(step)}: {problem}")
    return None


def resume(engine, run_dir: str | Path, layout: dict) -> dict:
    """Load the newest complete checkpoint; its client state ({} for a fresh run).

    Written by another world size or ep_size, only the module weights load (DeepSpeed re-shards the experts by
    global id) and the optimizer starts afresh: ZeRO shards and expert groups do not carry over.
    """
    found = [newest_complete(run_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)  # one verdict, or ranks could pick different tags
    found = found[0]
    if found is None:
        return {}
    ckpt_dir, tag = checkpoint_dir(run_dir), tag_for(found.step)
    same_layout = found.layout == layout
    if not same_layout and dist.get_rank() == 0:
        print(f"[tcd-ds] WARNING: {ckpt_dir / tag} was written with {found.layout}, this run has {layout}: "
              "loading the module weights only; the optimizer state starts afresh")
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_module_only=not same_layout,
        load_optimizer_states=same_layout, load_lr_scheduler_states=same_layout,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
    return {**(client_state or {}), "step": found.step, "elastic": not same_layout}
