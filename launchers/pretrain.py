"""Pre-train a dense teacher, an MoE baseline or an MoE student with TCD, as the run spec says.

    deepspeed --num_gpus 2 launchers/pretrain.py --spec ds_configs/teacher_tiny.yaml [--section.key=value ...]

Exit status 2 means the spec (or an override) is invalid; nothing was started.
"""

import argparse
import atexit
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
    parser.add_argument("--restart", action="store_true",
                        help="start over in an existing run_dir; what is there moves to RUN/restarts/K/")
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
        from tcd_ds.data.checks import check_data_files
        from tcd_ds.train.ds_config import check_world_size, deepspeed_config

        check_world_size(spec, world_size)
        check_data_files(spec.data)
        from tcd_ds.rundir.relaunch import check_relaunch

        check_relaunch(spec, args.restart)
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
    from tcd_ds.data.text import CorpusError
    from tcd_ds.distill.teacher import TeacherMismatch
    from tcd_ds.rundir.relaunch import RelaunchRefused
    from tcd_ds.train.faults import FileSystemFault
    from tcd_ds.train.preflight import warn_on_stale_build_locks
    from tcd_ds.train.guard import NonFiniteTraining
    from tcd_ds.train.trainer import train

    if os.environ.get("LOCAL_RANK", "0") == "0":
        warn_on_stale_build_locks()
    try:
        train(spec, restart=args.restart)
    except (TeacherMismatch, CorpusError, RelaunchRefused) as e:  # need the student's tokenizer / the corpus
        exit_without_teardown(refuse(args.spec, e))
    except FileSystemFault as e:  # every rank raises it; one line per node
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"[tcd-ds] {e}", file=sys.stderr)
        exit_without_teardown(1)
    except NonFiniteTraining as e:
        print(f"[tcd-ds] {e}", file=sys.stderr)
        exit_without_teardown(3)
    exit_without_teardown(0)


def exit_without_teardown(status: int) -> None:
    """End a rank that started a process group with `status`, skipping the interpreter's teardown.

    In the teardown (Py_FinalizeEx's garbage collection of modules) the gloo groups are freed while their worker
    threads run; CPython ends a non-main thread that then takes the GIL (e.g. to free a tensor whose Python
    object torch kept) with pthread_exit, whose unwinding through a noexcept C++ frame calls std::terminate:
    "terminate called without an active exception", SIGABRT, and a finished run exits non-zero (about 1 launch
    in 80 on a loaded machine). destroy_process_group() cannot free them first: DeepSpeed's engine, group
    registry and MoE layers keep references. Everything of the run is on disk by now (checkpoint, metrics, W&B
    finished); the atexit handlers (multiprocessing's, W&B's, tqdm's) still run."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
