"""One checkpoint tag of one of our runs, and DeepSpeed's files in it, read safely with errors that name the file.

Layout (DeepSpeed's, mp and pp size 1): `RUN/checkpoints/TAG/` holds `mp_rank_00_model_states.pt` (non-expert
module weights under "module"), `layer_{k}_expert_{g}_mp_rank_00_model_states.pt` (k the index among MoE
layers, g the global expert id) and one ZeRO shard per rank, `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tcd_ds.train.checkpoint import manifest_problem

MODEL_STATES = "mp_rank_00_model_states.pt"


class ConversionError(Exception):
    """A checkpoint that cannot be converted, or an output that must not be written; the message names the
    file, directory or tag."""


@dataclass(frozen=True)
class Checkpoint:
    run_dir: Path  # holds spec.yaml, tokenizer/, metrics.jsonl and checkpoints/
    tag: str

    @property
    def dir(self) -> Path:
        return self.run_dir / "checkpoints" / self.tag

    def expert_file(self, moe_layer_index: int, global_expert: int) -> Path:
        return self.dir / f"layer_{moe_layer_index}_expert_{global_expert}_mp_rank_00_model_states.pt"

    def optimizer_shard(self, rank: int, dtype: str) -> Path:
        prefix = "bf16_" if dtype == "bf16" else ""  # DeepSpeed names bf16 shards apart
        return self.dir / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def locate_checkpoint(path: str | Path, tag: str | None) -> Checkpoint:
    """A run directory, its `checkpoints/` directory or one tag directory in it; `tag` (else the one a tag
    directory names, else `checkpoints/latest`) picks the checkpoint."""
    path = Path(path)
    if (path / "spec.yaml").is_file():
        run_dir, named = path, None
    elif path.name == "checkpoints" and (path.parent / "spec.yaml").is_file():
        run_dir, named = path.parent, None
    elif path.parent.name == "checkpoints" and (path.parent.parent / "spec.yaml").is_file():
        run_dir, named = path.parent.parent, path.name
    else:
        raise ConversionError(
            f"{path} is not a run directory (with spec.yaml), its checkpoints/ directory or a tag directory in it"
        )
    if tag is not None and named is not None and tag != named:
        raise ConversionError(f"--tag {tag} disagrees with the tag directory {path}")
    tag = tag or named
    checkpoints = run_dir / "checkpoints"
    if tag is None:
        latest = checkpoints / "latest"
        if not latest.is_file():
            raise ConversionError(f"no checkpoint to convert: {latest} not found (pass --tag)")
        tag = latest.read_text().strip()
    if not (checkpoints / tag).is_dir():
        saved = sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else []
        raise ConversionError(
            f"unknown tag {tag!r}: {checkpoints / tag} does not exist (saved tags: {saved or 'none'})"
        )
    problem = manifest_problem(checkpoints / tag)
    if problem is not None:
        raise ConversionError(f"incomplete checkpoint {checkpoints / tag}: {problem}")
    return Checkpoint(run_dir, tag)


def load_file(path: Path, allowed_types: list[type] | None = None) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: tensors and plain containers only, plus `allowed_types` (never
    arbitrary code). A missing, truncated or corrupt file is a ConversionError naming it."""
    if not path.is_file():
        raise ConversionError(f"missing checkpoint file {path}")
    try:
        with torch.serialization.safe_globals(allowed_types or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ConversionError(f"cannot read {path}: truncated or corrupt? ({type(e).__name__}: {e})") from e


def zero_shard_types() -> list[type]:
    """The DeepSpeed objects a ZeRO optimizer shard pickles besides tensors (its loss scaler, the ZeRO stage,
    fragment addresses). Allowing exactly these keeps the shards on `weights_only=True`, where DeepSpeed's own
    zero_to_fp32.py loads them with `weights_only=False`, i.e. runs whatever the pickle says."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
