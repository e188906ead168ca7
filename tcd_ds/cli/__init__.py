"""The `tcd-ds` console script: one subcommand per command, each a module here with `main(argv) -> exit status`
(also runnable as `python -m tcd_ds.cli.NAME`; pre-training by DeepSpeed's runner as
`deepspeed ... --module tcd_ds.cli.pretrain`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # subcommand: (module, what it does)
    "pretrain": ("pretrain", "pre-train a teacher or a student, one process (ranks: deepspeed --module ...)"),
    "reproduce": ("reproduce", "the TCD protocol in one command: pre-train, convert, probe, fine-tune, compare"),
    "convert": ("convert", "a checkpoint of a run -> a Hugging Face directory"),
    "finetune": ("finetune", "fine-tune a converted model on a task over seeds"),
    "probe": ("probe", "the out-of-domain MLM probe of a converted model"),
    "prepare-data": ("prepare_data", "build a run spec's tokenizer and token blocks ahead of a launch"),
    "sweep": ("sweep", "run a W&B sweep file with no W&B server"),
    "presets": ("presets", "list the shipped run specs, protocol presets and sweeps, or print one's path"),
    "build-tasks": ("build_tasks", "regenerate the bundled downstream tasks from their raw files"),
    "build-corpus": ("build_corpus", "regenerate the bundled corpus from a MediaWiki dump"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "usage: tcd-ds COMMAND [ARGS ...]   (tcd-ds COMMAND --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tcd-ds: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"tcd_ds.cli.{COMMANDS[name][0]}")
    try:
        return module.main(rest)
    except SystemExit as e:  # argparse's --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else int(e.code is not None)


if __name__ == "__main__":
    sys.exit(main())
