"""W&B for a run: rank 0's mirror of metrics.jsonl, and what `wandb agent` hands a sweep trial.

`wandb` is imported only where a run starts, so ranks that never log do not pay for it. The API key is never
read or written here: W&B's own login finds it (env or netrc) in online mode, and offline mode needs none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from tcd_ds.spec import RunSpec, SpecError


class WandbLog:
    """One W&B run, resumed by id when a checkpoint carries one, so a relaunch continues the same run."""

    def __init__(self, spec: RunSpec, resume_id: str | None):
        import wandb

        w = spec.logging.wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity, mode=w.mode, tags=w.tags, group=w.group,
            config=spec.model_dump(mode="json"), dir=os.environ.get("WANDB_DIR", spec.run_dir),
            id=resume_id, resume="allow" if resume_id else None,
        )

    @property
    def run_id(self) -> str:
        return self.run.id

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def open_wandb(spec: RunSpec, resume_id: str | None) -> WandbLog | None:
    """Rank 0 only: other ranks must never create runs."""
    w = spec.logging.wandb
    return WandbLog(spec, resume_id) if w.enabled and w.mode != "disabled" else None


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as W&B charts it: lists (per-expert load) become one scalar per index."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, list):
            out.update({f"{key}/{i}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


def agent_overrides(environ: Mapping[str, str]) -> list[str]:
    """The trial's parameters from the file `wandb agent` points WANDB_SWEEP_PARAM_PATH at, in the agent's own
    `${args}` form (`--key=value`, value as Python prints it). The agent passes the same values in `${args}`
    when the command has it; put these first so an explicit command-line override wins."""
    path = environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path:
        return []
    try:
        params = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SpecError([f"WANDB_SWEEP_PARAM_PATH={path}: cannot read the sweep's parameters: {e}"]) from None
    return [f"--{key}={entry['value']}" for key, entry in params.items() if key != "wandb_version"]


def agent_run_dir(run_dir: str, environ: Mapping[str, str]) -> str:
    """Under `wandb agent` every trial runs the same command: give each its own run dir (RUN_DIR/<W&B run id>),
    or the second trial would resume from the first one's checkpoints."""
    if environ.get("WANDB_SWEEP_ID") and environ.get("WANDB_RUN_ID"):
        return str(Path(run_dir) / environ["WANDB_RUN_ID"])
    return run_dir
