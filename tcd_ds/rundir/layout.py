"""The one place that knows a run directory's layout:

    RUN/spec.yaml                 the resolved spec of the latest launch (for people; nothing reads it back when
                                  a checkpoint carries its own)
    RUN/spec_history/NNN.yaml     the spec of every launch that changed it, in order (tcd_ds.rundir.relaunch)
    RUN/restarts/K/               what `--restart` moved aside: an earlier run, itself a run directory
    RUN/tokenizer/                HF tokenizer files
    RUN/metrics.jsonl             one JSON record per logged step
    RUN/checkpoints/step_N/       DeepSpeed's files (mp and pp size 1): `mp_rank_00_model_states.pt` (non-expert
                                  module weights under "module"), `layer_{k}_expert_{g}_mp_rank_00_model_states.pt`
                                  (k the index among MoE layers, g the global expert id), one ZeRO shard per rank
                                  `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`; `spec.yaml`, the resolved
                                  spec it was written under; and `manifest.json`
    RUN/checkpoints/latest        the newest complete tag

A checkpoint counts only once its manifest (file names, sizes, sha256, written after every rank finished)
exists and matches: a save cut short or a truncated file is never resumed from, converted or taught from.
A checkpoint is self-describing: its own `spec.yaml` and the manifest's tokenizer fingerprint say what it is,
so a later launch that rewrites RUN/spec.yaml cannot change how it converts, teaches or resumes. Checkpoints
from before this (no `spec.yaml` inside) fall back to RUN/spec.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tcd_ds.spec import ModelSpec

TAG = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used as asked; the message names the file, directory or tag."""


def tag_for(step: int) -> str:
    return f"step_{step}"


def tokenizer_fingerprint(tokenizer) -> str:
    """A tokenizer's identity: the sha256 of its (token, id) vocabulary and special tokens, what gives token ids
    their meaning; the same after a save/load round trip, unlike its files."""
    content = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What a manifest says of one file."""
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def read_spec_file(path: Path) -> tuple[dict, ModelSpec]:
    """A resolved spec, raw, and its validated model section (the rest, e.g. data paths, need not be valid on
    this machine)."""
    try:
        spec = yaml.safe_load(path.read_text())
        return spec, ModelSpec.model_validate(spec["model"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not one of our run directories") from None
    except (yaml.YAMLError, KeyError, TypeError, ValidationError) as e:
        raise CheckpointError(f"{path}: not a run spec with a valid model section ({e})") from e


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    run_dir: Path
    tag: str

    @property
    def dir(self) -> Path:
        return self.run_dir / "checkpoints" / self.tag

    @property
    def step(self) -> int:
        return int(TAG.match(self.tag).group(1))

    @property
    def model_states(self) -> Path:
        return self.dir / MODEL_STATES

    def expert_file(self, moe_layer_index: int, global_expert: int) -> Path:
        return self.dir / f"layer_{moe_layer_index}_expert_{global_expert}_mp_rank_00_model_states.pt"

    def optimizer_shard(self, rank: int, dtype: str) -> Path:
        prefix = "bf16_" if dtype == "bf16" else ""  # DeepSpeed names bf16 shards apart
        return self.dir / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

    @property
    def spec_file(self) -> Path:
        return self.dir / "spec.yaml"

    def write_manifest(self, layout: dict[str, Any], files: dict[str, dict] | None = None) -> None:
        """Seal the tag: every file's size and sha256 (`files`, as each rank recorded its own; else every file
        found in the tag directory), plus the layout (world size, ep_size) and the tokenizer fingerprint."""
        if files is None:
            files = {p.name: file_record(p) for p in sorted(self.dir.iterdir()) if p.name != MANIFEST}
        tmp = self.dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({**layout, "files": dict(sorted(files.items()))}, indent=1))
        os.replace(tmp, self.dir / MANIFEST)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / MANIFEST).read_text())

    def read_spec(self) -> tuple[dict, ModelSpec]:
        """The spec this checkpoint was written under; RUN/spec.yaml for a checkpoint older than that."""
        if self.spec_file.is_file():
            return read_spec_file(self.spec_file)
        return RunDir(self.run_dir).read_spec()

    def tokenizer_fingerprint(self) -> str | None:
        """The fingerprint of the tokenizer this checkpoint was trained with (None: an older checkpoint)."""
        return self.manifest().get("tokenizer")

    def load_tokenizer(self):
        """The run's tokenizer (RUN/tokenizer/), checked against the fingerprint this checkpoint recorded."""
        from tcd_ds.data.tokenizer import load_tokenizer

        directory = RunDir(self.run_dir).tokenizer_dir
        if not directory.is_dir():
            raise CheckpointError(f"missing tokenizer directory {directory}")
        tokenizer = load_tokenizer(directory)
        expected = self.tokenizer_fingerprint()
        if expected is not None and tokenizer_fingerprint(tokenizer) != expected:
            raise CheckpointError(f"{directory} is not the tokenizer {self.dir} was trained with (fingerprint "
                                  f"{tokenizer_fingerprint(tokenizer)[:12]}, the manifest says {expected[:12]})")
        return tokenizer

    def is_sealed(self) -> bool:
        """Has a manifest; cheap (no hashing): what pruning counts."""
        return (self.dir / MANIFEST).is_file()

    def layout(self) -> dict[str, Any]:
        return {k: v for k, v in self.manifest().items() if k in ("world_size", "ep_size")}

    def problem(self, verify_contents: bool = True) -> str | None:
        """Why this is not a complete checkpoint, or None. Without `verify_contents` only the manifest is read
        (the save finished), for the checks made before a launch; the files are verified when they are loaded."""
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest (the save did not finish)"
        except json.JSONDecodeError:
            return "unreadable manifest"
        if not verify_contents:
            return None
        for name, expected in manifest["files"].items():
            path = self.dir / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
            if sha256(path) != expected["sha256"]:
                return f"{path} does not match its sha256 in the manifest (corrupt)"
        return None


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Checkpoint:
        return Checkpoint(self.path, tag_for(step))

    def steps(self) -> list[int]:
        """Steps with a tag directory, complete or not, ascending."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := TAG.match(p.name)) and p.is_dir())

    def latest_tag(self) -> str | None:
        latest = self.checkpoints / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def set_latest(self, step: int) -> None:
        tmp = self.checkpoints / ".latest.tmp"
        tmp.write_text(tag_for(step))
        os.replace(tmp, self.checkpoints / "latest")

    def newest_complete(self, log=print) -> Checkpoint | None:
        """The newest checkpoint that verifies against its manifest, reporting each newer one it skips."""
        for step in reversed(self.steps()):
            ckpt = self.checkpoint(step)
            problem = ckpt.problem()
            if problem is None:
                return ckpt
            log(f"[tcd-ds] skipping checkpoint {ckpt.dir}: {problem}")
        return None

    def newest_sealed(self) -> Checkpoint | None:
        """The newest checkpoint with a manifest, unverified (cheap): what a relaunch compares its spec with."""
        sealed = [s for s in self.steps() if self.checkpoint(s).is_sealed()]
        return self.checkpoint(sealed[-1]) if sealed else None

    def read_spec(self) -> tuple[dict, ModelSpec]:
        """The run-level spec (RUN/spec.yaml): only for checkpoints that do not carry their own."""
        return read_spec_file(self.spec_file)


def locate_checkpoint(path: str | Path, tag: str | None, verify_contents: bool = True) -> Checkpoint:
    """A run directory, its `checkpoints/` directory or one tag directory in it; `tag` (else the one a tag
    directory names, else `checkpoints/latest`) picks the checkpoint, which must be complete."""
    path = Path(path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "spec.yaml").is_file():
        run_dir, named = path.parent.parent, path.name  # a tag directory (which holds a spec.yaml of its own)
    elif (path / "spec.yaml").is_file():
        run_dir, named = path, None
    elif path.name == "checkpoints" and (path.parent / "spec.yaml").is_file():
        run_dir, named = path.parent, None
    else:
        raise CheckpointError(
            f"{path} is not a run directory (with spec.yaml), its checkpoints/ directory or a tag directory in it"
        )
    if tag is not None and named is not None and tag != named:
        raise CheckpointError(f"tag {tag} disagrees with the tag directory {path}")
    run = RunDir(run_dir)
    tag = tag or named or run.latest_tag()
    if tag is None:
        raise CheckpointError(f"no checkpoint in {run.checkpoints}: {run.checkpoints / 'latest'} not found (name a tag)")
    ckpt = Checkpoint(run_dir, tag)
    if not ckpt.dir.is_dir():
        saved = [tag_for(step) for step in run.steps()]  # in step order
        raise CheckpointError(f"unknown tag {tag!r}: {ckpt.dir} does not exist (saved tags: {saved or 'none'})")
    problem = ckpt.problem(verify_contents)
    if problem is not None:
        raise CheckpointError(f"incomplete checkpoint {ckpt.dir}: {problem}")
    return ckpt
