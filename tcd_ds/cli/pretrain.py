"""Pre-train a dense teacher, an MoE baseline or an MoE student with TCD, as the run spec says.

    deepspeed --num_gpus N --module tcd_ds.cli.pretrain --spec SPEC [--section.key=value ...] [--dry-run]
    tcd-ds pretrain --spec SPEC ...          # one process (and --dry-run / --print-schema anywhere)

SPEC is a YAML file or a shipped spec's name (`tcd-ds presets`). `--dry-run` validates, prints the resolved spec
and the generated DeepSpeed config, and exits (`--world-size N` to assume N ranks). Relaunching into a run
directory resumes it; a spec that changes what its checkpoints are is refused unless `--restart` (which moves what
is there to RUN_DIR/restarts/K/). Exit status 2: the spec, an override or a file it names cannot be used; nothing
was started. Exit status 1: a file-system fault during the run (the line names the path and the last complete
checkpoint).
"""

from __future__ import annotations

import atexit
import json
import os
import sys

from tcd_ds.cli.common import parse_command_line, print_schema, refuse, say, wants_help
from tcd_ds.spec import RunSpec, SpecError, dump_spec, load_spec

SINGLE_PROCESS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                  "MASTER_ADDR": "127.0.0.1"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv, __doc__):
        return 0
    what = "invalid run spec"
    try:
        line = parse_command_line(argv, options=("spec", "world-size", "local_rank"),
                                  flags=("dry-run", "print-schema", "restart"))
        if "print-schema" in line.flags:
            return print_schema(RunSpec)
        spec_name = line.options.get("spec")
        what += f" {spec_name}" if spec_name else ""
        world_size = int(line.options.get("world-size") or os.environ.get("WORLD_SIZE", "1"))
        from tcd_ds.checks import check_files, check_spec
        from tcd_ds.rundir.relaunch import check_relaunch
        from tcd_ds.train.wandb_run import agent_overrides, agent_run_dir

        spec = load_spec(spec_name, agent_overrides(os.environ) + line.overrides)
        spec.run_dir = agent_run_dir(spec.run_dir, os.environ)
        check_spec(spec, world_size)
        check_files(spec)
        check_relaunch(spec, "restart" in line.flags)
    except (SpecError, ValueError) as e:
        return refuse(what, e)
    if "dry-run" in line.flags:
        from tcd_ds.train.ds_config import deepspeed_config

        print("# resolved run spec")
        print(dump_spec(spec))
        print(f"# generated DeepSpeed config (world size {world_size})")
        print(json.dumps(deepspeed_config(spec, world_size), indent=2))
        return 0
    from tcd_ds.checks import warn_on_stale_build_locks
    from tcd_ds.data.text import CorpusError
    from tcd_ds.distill.teacher import TeacherMismatch
    from tcd_ds.rundir.relaunch import RelaunchRefused
    from tcd_ds.train.device import AcceleratorMismatch, check_accelerator
    from tcd_ds.train.ds_config import accelerator_name
    from tcd_ds.train.faults import FileSystemFault
    from tcd_ds.train.guard import NonFiniteTraining
    from tcd_ds.train.launch import free_port
    from tcd_ds.train.trainer import train

    try:
        check_accelerator(accelerator_name())
    except AcceleratorMismatch as e:
        return refuse("accelerator", e)
    if "RANK" not in os.environ:  # not started by a launcher: a world of one process
        os.environ.update({**SINGLE_PROCESS, "MASTER_PORT": str(free_port())})
    if os.environ.get("LOCAL_RANK", "0") == "0":
        warn_on_stale_build_locks()
    try:
        train(spec, restart="restart" in line.flags)
    except (TeacherMismatch, CorpusError, RelaunchRefused) as e:  # need the student's tokenizer / the corpus
        exit_without_teardown(refuse(what, e))
    except FileSystemFault as e:  # every rank raises it; one line per node
        if os.environ.get("LOCAL_RANK", "0") == "0":
            say(f"[tcd-ds] {e}")
        exit_without_teardown(1)
    except NonFiniteTraining as e:
        say(f"[tcd-ds] {e}")
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
