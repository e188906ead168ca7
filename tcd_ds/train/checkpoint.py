"""The checkpointer: when to save, how a save becomes a checkpoint that counts, and what a resume restores.

DeepSpeed writes each rank's files into the tag directory; once every rank is done, rank 0 seals it with a
manifest (tcd_ds.rundir) and only then points `latest` at it. A tag without a valid manifest (a save cut short,
a truncated file) is never resumed from and never counts towards `keep_last`, and pruning only happens after the
new manifest exists, so a failed save never costs the previous checkpoint. Assumes the run directory is on
storage all ranks share, as DeepSpeed's own loading does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import deepspeed.comm as dist

from tcd_ds.rundir import RunDir


@dataclass(frozen=True)
class Resumed:
    """What a launch continues from (step 0 and nothing else for a fresh run)."""

    step: int = 0
    consumed_samples: int | None = None  # training samples consumed before `step` (None: step x global batch)
    wandb_run_id: str | None = None
    elastic: bool = False  # written by another world size or ep_size: module weights only


class Checkpointer:
    """Saves every `every` steps and at a launch's last step; keeps the last `keep_last` complete ones."""

    def __init__(self, engine, run_dir: RunDir, every: int, keep_last: int, layout: dict):
        self.engine, self.run_dir = engine, run_dir
        self.every, self.keep_last = every, keep_last
        self.layout = layout  # the world size and ep_size of this launch, recorded in each manifest
        self.last_saved = 0

    def should_save(self, step: int, launch_end: int) -> bool:
        return step % self.every == 0 or step == launch_end

    def save(self, step: int, client_state: dict) -> None:
        """Every rank writes its part; rank 0 then seals the tag with a manifest, moves `latest`, and prunes."""
        ckpt, checkpoints = self.run_dir.checkpoint(step), self.run_dir.checkpoints
        if dist.get_rank() == 0 and ckpt.dir.exists():
            shutil.rmtree(ckpt.dir)  # the leftover of a save that did not finish, never a complete checkpoint
        dist.barrier()
        self.engine.save_checkpoint(str(checkpoints), tag=ckpt.tag, client_state={**client_state, "step": step},
                                    save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            ckpt.write_manifest({"step": step, **self.layout})
            self.run_dir.set_latest(step)
            sealed = [s for s in self.run_dir.steps() if self.run_dir.checkpoint(s).is_sealed()]
            keep = set(sealed[-self.keep_last:])
            for old in self.run_dir.steps():
                if old < step and old not in keep:
                    shutil.rmtree(self.run_dir.checkpoint(old).dir, ignore_errors=True)
        dist.barrier()
        self.last_saved = step

    def resume(self) -> Resumed:
        """Load the newest complete checkpoint, if any.

        Written by another world size or ep_size, only the module weights load (DeepSpeed re-shards the experts by
        global id) and the optimizer starts afresh: ZeRO shards and expert groups do not carry over.
        """
        found = [self.run_dir.newest_complete() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(found, src=0)  # one verdict, or ranks could pick different tags
        ckpt = found[0]
        if ckpt is None:
            return Resumed()
        written_with = ckpt.layout()
        same_layout = written_with == self.layout
        if not same_layout and dist.get_rank() == 0:
            print(f"[tcd-ds] WARNING: {ckpt.dir} was written with {written_with}, this run has {self.layout}: "
                  "loading the module weights only; the optimizer state starts afresh")
        path, state = self.engine.load_checkpoint(
            str(self.run_dir.checkpoints), tag=ckpt.tag, load_module_only=not same_layout,
            load_optimizer_states=same_layout, load_lr_scheduler_states=same_layout,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt.dir}")
        state = state or {}
        self.last_saved = ckpt.step
        return Resumed(self.last_saved, state.get("consumed_samples"), state.get("wandb_run_id"), not same_layout)
