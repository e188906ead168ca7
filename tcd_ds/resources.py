"""What ships inside the package, found from any directory: the run specs, protocol presets and sweep files
(`presets/`), and the bundled corpus and tasks (`bundled/`). An installed wheel runs the README's commands with
no checkout: a shipped spec is named by its stem (`--spec teacher_tiny`), a protocol preset by its stem without
`protocol_` (`--preset tiny`), a sweep file by its stem, a bundled file as `bundled:wiki/train.txt` and a bundled
task by its folder's name (`movie_reviews`). An existing path always wins over a name.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE = Path(str(files("tcd_ds")))
PRESETS = PACKAGE / "presets"
BUNDLED = PACKAGE / "bundled"
BUNDLED_PREFIX = "bundled:"


def bundled_path(path: str) -> str:
    """`bundled:REL` as the absolute path of the package's bundled file REL; any other path unchanged."""
    if path.startswith(BUNDLED_PREFIX):
        return str(BUNDLED / path[len(BUNDLED_PREFIX):])
    return path


def portable_path(path: str) -> str:
    """A bundled file's absolute path back as `bundled:REL`, any other path unchanged: what a spec records, so a run
    made with one installation of the package compares equal to the same spec in another (a venv, a checkout)."""
    resolved = Path(path)
    if resolved.is_absolute() and resolved.is_relative_to(BUNDLED):
        return BUNDLED_PREFIX + resolved.relative_to(BUNDLED).as_posix()
    return path


def shipped(kind: str) -> dict[str, Path]:
    """The shipped files of one kind by name: `spec` (run specs), `preset` (protocol presets), `sweep`."""
    if kind == "preset":
        return {p.stem.removeprefix("protocol_"): p for p in sorted(PRESETS.glob("protocol_*.yaml"))}
    if kind == "spec":
        return {p.stem: p for p in sorted(PRESETS.glob("*.yaml")) if not p.stem.startswith("protocol_")}
    if kind == "sweep":
        return {p.stem: p for p in sorted((PRESETS / "sweeps").glob("*.yaml"))}
    raise ValueError(f"unknown kind of shipped file: {kind}")


def bundled_tasks() -> dict[str, Path]:
    """The bundled downstream tasks (folders with a task.yaml) by name."""
    return {p.parent.name: p.parent for p in sorted((BUNDLED / "tasks").glob("*/task.yaml"))}


def find_file(name_or_path: str | Path, kind: str) -> Path:
    """An existing file as it is, else the shipped file of that kind with that name (a directory named like one,
    such as a run directory `demo/`, does not hide it); FileNotFoundError names both possibilities (and the
    shipped names)."""
    path = Path(bundled_path(str(name_or_path)))
    known = shipped(kind)
    if path.is_file() or (path.exists() and str(name_or_path) not in known):
        return path
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    raise FileNotFoundError(f"{name_or_path}: no such file, nor a shipped {kind} ({', '.join(known)})")
