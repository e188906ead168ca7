"""A relaunch into an existing run directory: continue, refuse, or (`--restart`) start over, decided before
anything in the run directory is written.

The rule, one for every field: a field is an *identity* field when the checkpoint's tensors or the meaning of
the token ids depend on it. Those are the `model` section (shapes, experts, the routing the experts were trained
under: all of it goes into the converted model's config) except `model.moe.ep_size`, which only places the
experts on ranks (an elastic resume re-shards them); `data.seq_len`; `data.tokenizer`; and the tokenizer itself
(its fingerprint, which also changes when a tokenizer trained from `data.train` comes out differently). A
relaunch that changes an identity field is refused, one line per field. Every other field (optimisation, steps,
batch sizes, data files, distillation, logging, checkpoint cadence) is one the run can continue under: the change
is printed and the new spec is added to RUN/spec_history/. `run_dir` is not compared: a run directory may move.

`--restart` starts over in the same run directory without losing anything: what is there is moved, whole, to
RUN/restarts/K/ (K = 1, 2, ...), itself a run directory whose checkpoints still convert, teach and resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tcd_ds.rundir.layout import CheckpointError, RunDir

IDENTITY_FIELDS = ("model", "data.seq_len", "data.tokenizer")
PLACEMENT_FIELDS = ("model.moe.ep_size",)  # inside `model`, yet not identity: where the experts live
NOT_COMPARED = ("run_dir",)  # where the run is, not what it is: a run directory may be moved


class RelaunchRefused(ValueError):
    """The spec cannot continue the run in its run directory; one line per field."""


def flatten(spec: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(spec, dict) and spec:
        return {k: v for key, value in spec.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): spec}


def is_identity(key: str) -> bool:
    return key not in PLACEMENT_FIELDS and any(key == f or key.startswith(f"{f}.") for f in IDENTITY_FIELDS)


def spec_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; a section present on one side only
    (e.g. `model.moe`) shows as its leaves."""
    a, b = flatten(old), flatten(new)
    keys = sorted((a.keys() | b.keys()) - set(NOT_COMPARED))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


@dataclass
class Relaunch:
    """What a launch does with its run directory; decided by `plan_relaunch`, done by `apply`."""

    run_dir: RunDir
    restart: bool = False
    continued: list[str] = field(default_factory=list)  # accepted changes, one line each

    def apply(self, spec_text: str) -> None:
        """Rank 0, after the decision: move an earlier run aside (restart), then write the spec."""
        path = self.run_dir.path
        if self.restart:
            restarts = path / "restarts"
            target = restarts / str(1 + max((int(p.name) for p in restarts.glob("*") if p.name.isdigit()), default=0))
            target.mkdir(parents=True)
            for entry in path.iterdir():
                if entry.name != "restarts":
                    os.replace(entry, target / entry.name)
            print(f"[tcd-ds] --restart: the earlier run in {path} is now {target}", flush=True)
        path.mkdir(parents=True, exist_ok=True)
        history = path / "spec_history"
        history.mkdir(exist_ok=True)
        entries = sorted(history.glob("*.yaml"))
        if not entries or entries[-1].read_text() != spec_text:
            (history / f"{len(entries):03d}.yaml").write_text(spec_text)
        self.run_dir.spec_file.write_text(spec_text)


def plan_relaunch(run_dir: RunDir, spec: dict, tokenizer_fingerprint: str | None, restart: bool) -> Relaunch:
    """Compare the launch's resolved spec with the newest sealed checkpoint's (falling back to RUN/spec.yaml
    for a checkpoint without its own); raises RelaunchRefused on identity changes. Writes nothing. The launcher
    calls it before any process group starts, without the tokenizer (`tokenizer_fingerprint=None`: not built
    yet); the trainer calls it again once the tokenizer exists."""
    ckpt = run_dir.newest_sealed()
    if ckpt is None:
        return Relaunch(run_dir, restart=restart and run_dir.path.is_dir() and any(run_dir.path.iterdir()))
    if restart:
        return Relaunch(run_dir, restart=True)
    try:
        written, _ = ckpt.read_spec()
    except CheckpointError as e:
        raise RelaunchRefused(f"run_dir {run_dir.path}: cannot read the spec of {ckpt.dir}: {e}") from None
    changes = spec_changes(written, spec)
    refused = [f"{k}: {ckpt.tag} has {a!r}, this launch has {b!r}" for k, a, b in changes if is_identity(k)]
    written_tokenizer = ckpt.tokenizer_fingerprint()
    if None not in (written_tokenizer, tokenizer_fingerprint) and written_tokenizer != tokenizer_fingerprint:
        refused.append(f"tokenizer: {ckpt.tag} was trained with tokenizer {written_tokenizer[:12]}, this launch's is "
                       f"{tokenizer_fingerprint[:12]} (another vocabulary)")
    if refused:
        raise RelaunchRefused("\n".join([
            f"run_dir {run_dir.path} holds checkpoints of another model or data; nothing was written. Pass "
            "--restart to start over there (the earlier run is moved to restarts/), or choose a new run_dir:",
            *refused,
        ]))
    return Relaunch(run_dir, continued=[f"{k}: {a!r} -> {b!r}" for k, a, b in changes])


def check_relaunch(spec, restart: bool) -> None:
    """The launcher's check, before any process group: refuses a spec that cannot continue `spec.run_dir`."""
    plan_relaunch(RunDir(spec.run_dir), spec.model_dump(mode="json"), None, restart)
