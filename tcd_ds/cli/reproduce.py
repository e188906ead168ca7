"""The TCD protocol in one command: a weak dense teacher -> MoE baseline and MoE+TCD on the same budget ->
conversion to Hugging Face -> out-of-domain MLM probe -> fine-tuning on the chosen tasks over the chosen seeds ->
a comparison table (results.md, results.json) and plots (plots/*.png) in the output directory.

    tcd-ds reproduce [--preset demo|tiny|small|PATH] [--out DIR] [--ablate [LOC ...]] [--section.key=value ...]
                     [--dry-run] [--print-schema]

Pre-training runs through the `deepspeed` runner as a user runs it (the preset's `deepspeed` arguments), one
OpenMP thread per rank unless OMP_NUM_THREADS is set. Probes and fine-tunings (`tcd-ds probe`, `tcd-ds finetune`)
run side by side, one per device slot (the preset's `jobs`: one per GPU by default, on CPU one), each pinned to
its share of the cores; the slots change no result. Rerunning skips finished stages and resumes an interrupted
one; a stage whose settings changed runs again, and so does everything after it. `--ablate` adds one TCD run per
relation location (all enabled ones, or those named) with that location off. Every stage's spec is validated with
its overrides before the first stage starts. Exit status: 2 for an invalid preset (or a file it names), 1 for a
failed stage (its log is named).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tcd_ds.cli.common import CommandLine, parse_command_line, print_schema, refuse, wants_help
from tcd_ds.spec import RELATION_LOCATIONS, SpecError, dump_spec

DEFAULT_PRESET = "demo"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv, __doc__):
        return 0
    from tcd_ds.protocol.preset import Preset, load_preset

    preset_name = DEFAULT_PRESET
    try:
        line = parse_command_line(argv, options=("preset", "out"), flags=("dry-run", "print-schema"))
        if "print-schema" in line.flags:
            return print_schema(Preset)
        preset_name = line.options.get("preset", DEFAULT_PRESET)
        overrides, ablate = split_ablate(line)
        preset = load_preset(preset_name, overrides, ablate)
    except (SpecError, ValueError) as e:
        return refuse(f"invalid protocol preset {preset_name}", e)
    out = Path(line.options.get("out") or preset.out_dir)
    if "dry-run" in line.flags:
        print(dump_spec(preset), end="")
        print(f"# output directory: {out}")
        return 0
    return run_protocol(preset, out)


def split_ablate(line: CommandLine) -> tuple[list[str], list[str] | None]:
    """`--ablate` alone (every enabled location) or `--ablate trunk attention`, out of the preset overrides."""
    ablate, overrides = None, []
    for arg in line.overrides:
        key, _, value = arg[2:].partition("=")
        if key != "ablate":
            overrides.append(arg)
            continue
        names = [] if value == "True" else [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        unknown = [n for n in names if n not in RELATION_LOCATIONS]
        if unknown:
            raise SpecError([f"--ablate: {unknown} not among {', '.join(RELATION_LOCATIONS)}"])
        ablate = names
    return overrides, ablate


def run_protocol(preset, out: Path) -> int:
    from tcd_ds.protocol.plan import stages
    from tcd_ds.protocol.plots import write_plots
    from tcd_ds.protocol.report import gather, write_report
    from tcd_ds.protocol.slots import make_slots
    from tcd_ds.protocol.stages import StageFailed, minutes, run_stages
    from tcd_ds.rundir import RunDir
    from tcd_ds.train.metrics import read_metrics

    start = time.perf_counter()
    rows, plan = stages(preset, out)
    try:
        run_stages(plan, out, slots=make_slots(preset.jobs.slots, preset.jobs.threads, preset.jobs.pin))
    except StageFailed as e:
        print(f"[protocol] {e}", file=sys.stderr)
        return 1
    results = gather(preset, rows, out)
    table = write_report(results, out)
    records = {m.name: read_metrics(RunDir(m.run_dir).metrics_file) for m in rows if m.run_dir is not None}
    plots = write_plots(records, results, out / "plots")
    print(f"[protocol] report: {out / 'results.md'}, {out / 'results.json'}, plots: "
          f"{', '.join(str(p) for p in plots)}")
    print(f"[protocol] finished in {minutes(time.perf_counter() - start)}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
