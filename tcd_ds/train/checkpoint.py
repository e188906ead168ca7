"""The checkpointer: when to save, how a save becomes a checkpoint that counts, and what a resume restores.

DeepSpeed writes each rank's files into the tag directory; every rank records the files it wrote (through
DeepSpeed's checkpoint engine) and hashes them itself, and rank 0 gathers those records and seals the tag with a
manifest (tcd_ds.rundir), then points `latest` at it. No rank lists or reads another node's files: on NFS a
listing can miss them, and hashing them all on one rank holds every other rank in a barrier. A tag without a
valid manifest (a save cut short, a truncated file) is never resumed from and never counts towards `keep_last`,
and pruning only happens after the new manifest exists, so a failed save never costs the previous checkpoint.
A failed write ends the run on every rank with one line (tcd_ds.train.faults). Assumes the run directory is on
storage all ranks share, as DeepSpeed's own loading does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import deepspeed.comm as dist

from tcd_ds.rundir import RunDir
from tcd_ds.rundir.layout import file_record
from tcd_ds.train.faults import FileSystemFault, agree, attempt, describe


@dataclass(frozen=True)
class Resumed:
    """What a launch continues from (step 0 and nothing else for a fresh run)."""

    step: int = 0
    consumed_samples: int | None = None  # training samples consumed before `step` (None: step x global batch)
    wandb_run_id: str | None = None
    elastic: bool = False  # written by another world size or ep_size: module weights only


class RecordingWrites:
    """Wraps DeepSpeed's checkpoint engine: each file this rank writes is recorded, and a failed write is kept
    as a fault instead of raised, so the rank still reaches DeepSpeed's closing barrier with the others."""

    def __init__(self, engine):
        self.inner_save = engine.save
        self.written: list[Path] = []
        self.fault: str | None = None
        engine.save = self.save

    def save(self, state_dict, path) -> None:
        def write():
            with open(path, "wb") as f:  # a file object: torch.save then fails with the OSError as context
                self.inner_save(state_dict, f)

        problem = None if self.fault else attempt(write, path)
        self.fault = self.fault or problem
        if problem is None:
            self.written.append(Path(path))

    def records(self) -> dict[str, dict]:
        """Size and sha256 of each file written since the last call, hashed here (by the rank that wrote it)."""
        written, self.written = self.written, []
        return {path.name: file_record(path) for path in written}


class Checkpointer:
    """Saves every `every` steps and at a launch's last step; keeps the last `keep_last` complete ones.
    `identity`: what each manifest records besides the files (layout of this launch, tokenizer fingerprint);
    `spec_text`: the resolved spec, copied into each checkpoint."""

    def __init__(self, engine, run_dir: RunDir, every: int, keep_last: int, identity: dict, spec_text: str):
        self.engine, self.run_dir = engine, run_dir
        self.every, self.keep_last = every, keep_last
        self.identity, self.spec_text = identity, spec_text
        self.layout = {k: identity[k] for k in ("world_size", "ep_size")}
        self.writes = RecordingWrites(engine.checkpoint_engine)
        self.last_saved = 0

    def should_save(self, step: int, launch_end: int) -> bool:
        return step % self.every == 0 or step == launch_end

    def last_complete(self) -> Path | None:
        return self.run_dir.checkpoint(self.last_saved).dir if self.last_saved else None

    def save(self, step: int, client_state: dict) -> None:
        """Every rank writes and hashes its part; rank 0 writes the spec, seals the tag with a manifest of
        everyone's records, moves `latest`, and prunes. Each phase ends with every rank agreeing on faults."""
        ckpt, rank = self.run_dir.checkpoint(step), dist.get_rank()
        problem = None
        if rank == 0:
            def prepare():
                if ckpt.dir.exists():
                    shutil.rmtree(ckpt.dir)  # the leftover of a save that did not finish, never a complete one
                ckpt.dir.mkdir(parents=True)
                ckpt.spec_file.write_text(self.spec_text)
                self.writes.written.append(ckpt.spec_file)
            problem = attempt(prepare, ckpt.dir)
        agree(problem, self.last_complete())

        try:
            self.engine.save_checkpoint(str(self.run_dir.checkpoints), tag=ckpt.tag,
                                        client_state={**client_state, "step": step}, save_latest=False)
        except (OSError, RuntimeError) as e:  # a write outside the checkpoint engine (its recovery script)
            self.writes.fault = self.writes.fault or describe(self.run_dir.checkpoints, e)
            dist.barrier()  # after its first write DeepSpeed's only collective is its closing barrier: join it
        problem, self.writes.fault = self.writes.fault, None
        records = {}
        if problem is None:
            try:
                records = self.writes.records()
            except OSError as e:  # a file that vanished before it was hashed
                problem = describe(None, e)
        agree(problem, self.last_complete())

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        problem = None
        if rank == 0:
            files = {name: record for part in gathered for name, record in part.items()}
            problem = attempt(lambda: self.seal(step, files), ckpt.dir)
        agree(problem, self.last_complete())
        self.last_saved = step

    def seal(self, step: int, files: dict[str, dict]) -> None:
        """Rank 0: the manifest, `latest`, then pruning down to `keep_last` sealed checkpoints."""
        self.run_dir.checkpoint(step).write_manifest({"step": step, **self.identity}, files)
        self.run_dir.set_latest(step)
        sealed = [s for s in self.run_dir.steps() if self.run_dir.checkpoint(s).is_sealed()]
        keep = set(sealed[-self.keep_last:])
        for old in self.run_dir.steps():
            if old < step and old not in keep:
                shutil.rmtree(self.run_dir.checkpoint(old).dir, ignore_errors=True)

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
        try:
            path, state = self.engine.load_checkpoint(
                str(self.run_dir.checkpoints), tag=ckpt.tag, load_module_only=not same_layout,
                load_optimizer_states=same_layout, load_lr_scheduler_states=same_layout,
            )
        except OSError as e:  # verified by rank 0 a moment ago, then gone: this rank cannot go on
            raise FileSystemFault(f"file system fault: {describe(None, e)} while resuming from {ckpt.dir}") from e
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt.dir}")
        state = state or {}
        self.last_saved = ckpt.step
        return Resumed(self.last_saved, state.get("consumed_samples"), state.get("wandb_run_id"), not same_layout)
