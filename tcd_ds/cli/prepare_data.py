"""Build a run spec's data cache ahead of a launch: the tokenizer (if the spec trains one) and the train and
validation blocks, into `data.cache_dir`, exactly as the launch would build them, tokenized by N processes.

    tcd-ds prepare-data --spec teacher_small [--num-proc N] [--section.key=value ...]

Overrides are the launcher's (`--data.train=[...]`, `--data.cache_dir=...`). Run it once, on one machine,
with the cache directory on the storage the job's nodes share; the launch then maps the cache. If another
process is building the same cache, this one waits for it (the cache lock). Exit status 2: an invalid spec.
"""

from __future__ import annotations

import argparse
import sys
import time

from tcd_ds.checks import check_files
from tcd_ds.cli.common import refuse
from tcd_ds.data.prepare import prepare_data
from tcd_ds.data.stream import default_num_proc
from tcd_ds.spec import SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcd-ds prepare-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="run spec YAML")
    parser.add_argument("--num-proc", type=int, default=None,
                        help=f"tokenizing processes (default: the usable cores, {default_num_proc(None)})")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.num_proc is not None and args.num_proc < 1:
        parser.error("--num-proc must be at least 1")
    try:
        spec = load_spec(args.spec, overrides)
        check_files(spec.model_copy(update={"distill": None}))  # the data and tokenizer (the teacher is not read)
    except (SpecError, ValueError) as e:
        return refuse(f"invalid run spec{' ' + args.spec if args.spec else ''}", e)
    started = time.perf_counter()
    data = prepare_data(spec.data, num_proc=args.num_proc or default_num_proc(None), progress=True)
    stats = data.train_stats
    print(f"[tcd-ds] data cache ready in {time.perf_counter() - started:.1f} s under {spec.data.cache_dir}: "
          f"vocabulary {len(data.tokenizer)}, train {stats['blocks']} blocks ({stats['tokens']} tokens, "
          f"{stats['lines']} lines, {stats['skipped_lines']} skipped), validation {len(data.validation)} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
