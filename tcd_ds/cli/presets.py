"""The files that ship with the package, by name: run specs (`--spec NAME`), protocol presets (`--preset NAME`)
and sweep files (`tcd-ds sweep NAME`).

    tcd-ds presets            # every name, with its path
    tcd-ds presets NAME       # the path of one (e.g. for `wandb sweep "$(tcd-ds presets tcd_relations)"`)
"""

from __future__ import annotations

import sys

from tcd_ds.cli.common import refuse, wants_help
from tcd_ds.resources import shipped

KINDS = {"spec": "run specs (--spec NAME)", "preset": "protocol presets (tcd-ds reproduce --preset NAME)",
         "sweep": "sweeps (tcd-ds sweep NAME)"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv, __doc__):
        return 0
    if len(argv) > 1:
        return refuse("presets", ValueError(f"one name expected, got {argv}"))
    if argv:
        for kind in KINDS:
            if argv[0] in shipped(kind):
                print(shipped(kind)[argv[0]])
                return 0
        return refuse("presets", ValueError(f"{argv[0]}: no shipped spec, preset or sweep of that name"))
    for kind, title in KINDS.items():
        print(f"{title}:")
        for name, path in shipped(kind).items():
            print(f"  {name:<20} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
