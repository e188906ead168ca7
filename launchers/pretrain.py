"""Pre-train a dense teacher, an MoE baseline or an MoE student with TCD, as the run spec says.

    deepspeed --num_gpus 2 launchers/pretrain.py --spec ds_configs/teacher_tiny.yaml [--section.key=value ...]

Exit status 2 means the spec (or an override) is invalid; nothing was started.
"""

import argparse
import json
import os
import sys

from tcd_ds.spec import RunSpec, SpecError, dump_spec, load_spec
from tcd_ds.train.wandb_run import agent_overrides, agent_run_dir


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="run spec YAML (defaults are used for anything it leaves out)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print spec and DeepSpeed config, exit")
    parser.add_argument("--print-schema", action="store_true", help="print the run spec's JSON Schema and exit")
    parser.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_known_args(argv)


def refuse(spec_path: str | None, problem: Exception) -> int:
    print(f"invalid run spec{' ' + spec_path if spec_path else ''}:", file=sys.stderr)
    for line in str(problem).splitlines():
        print(f"  {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_schema:
        print(json.dumps(RunSpec.model_json_schema(), indent=2))
        return 0
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        spec = load_spec(args.spec, agent_overrides(os.environ) + overrides)
        spec.run_dir = agent_run_dir(spec.run_dir, os.environ)
        from tcd_ds.train.ds_config import check_world_size, deepspeed_config

        check_world_size(spec, world_size)
        if spec.distill is not None:
            from tcd_ds.distill.teacher import check_teacher_fits_spec

            check_teacher_fits_spec(spec)
    except (SpecError, ValueError) as e:
        return refuse(args.spec, e)
    if args.dry_run:
        print("# resolved run spec")
        print(dump_spec(spec))
        print(f"# generated DeepSpeed config (world size {world_size})")
        print(json.dumps(deepspeed_config(spec, world_size), indent=2))
        return 0
    from tcd_ds.distill.teacher import TeacherMismatch
    from tcd_ds.train.preflight import warn_on_stale_build_locks
    from tcd_ds.train.guard import NonFiniteTraining
    from tcd_ds.train.trainer import train

    if os.environ.get("LOCAL_RANK", "0") == "0":
        warn_on_stale_build_locks()
    try:
        train(spec)
    except TeacherMismatch as e:  # found once the student's tokenizer exists
        return refuse(args.spec, e)
    except NonFiniteTraining as e:
        print(f"[tcd-ds] {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
