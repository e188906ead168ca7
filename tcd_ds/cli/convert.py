"""Convert a checkpoint of a tcd-ds run to a Hugging Face directory.

    tcd-ds convert RUN_OR_CHECKPOINT_DIR OUTPUT_DIR [--tag TAG] [--force]

A dense teacher becomes a plain `BertForMaskedLM` directory; an MoE student (any world size, any ep_size) a
`moe_bert` directory that loads without DeepSpeed, through `tcd_ds.models.register_auto_classes()` +
`AutoModelForMaskedLM` or through `trust_remote_code=True`. Exit status 2 with one line naming the file,
directory or tag that cannot be used; 1 when writing the output fails.
"""

from __future__ import annotations

import argparse
import sys

from tcd_ds.cli.common import refuse
from tcd_ds.hf.convert import convert
from tcd_ds.rundir import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcd-ds convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory, its checkpoints/ directory or a tag directory in it")
    parser.add_argument("output", help="the Hugging Face directory to write (must be empty or absent)")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step_1000 (default: checkpoints/latest)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    try:
        output = convert(args.source, args.output, tag=args.tag, force=args.force)
    except CheckpointError as e:  # the user's run, checkpoint, tag or output directory
        return refuse("convert", e)
    except OSError as e:  # a fault while writing: nothing is left half-written (a temporary directory)
        print(f"tcd-ds convert: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
