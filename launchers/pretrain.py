"""Pre-train a dense teacher, an MoE baseline or an MoE student with TCD, as the run spec says.

    deepspeed --num_gpus 2 launchers/pretrain.py --spec ds_configs/teacher_tiny.yaml [--section.key=value ...]

Exit status 2 means the spec (or an override) is invalid; nothing was started.
"""

import argparse
import json
import os
import sys

from tcd_ds.spec import RunSpec, SpecError, dump_spec, load_spec


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="run spec YAML (defaults are used for anything it leaves out)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print spec and DeepSpeed config, exit")
    parser.add_argument("--print-schema", action="store_true", help="print the run spec's JSON Schema and exit")
    parser.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_schema:
        print(json.dumps(RunSpec.model_json_schema(), indent=2))
        return 0
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        spec = load_spec(args.spec, overrides)
        from tcd_ds.ds_config import check_world_size, deepspeed_config

        check_world_size(spec, world_size)
    except (SpecError, ValueError) as e:
        print(f"invalid run spec{' ' + args.spec if args.spec else ''}:", file=sys.stderr)
        for line in str(e).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("# resolved run spec")
        print(dump_spec(spec))
        print(f"# generated DeepSpeed config (world size {world_size})")
        print(json.dumps(deepspeed_config(spec, world_size), indent=2))
        return 0
    from tcd_ds.train.trainer import train

    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
