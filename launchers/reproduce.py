"""The TCD protocol in one command: a weak dense teacher -> MoE baseline and MoE+TCD on the same budget ->
conversion to Hugging Face -> out-of-domain MLM probe -> fine-tuning on the chosen tasks over the chosen seeds ->
a comparison table (results.md, results.json) and plots (plots/*.png) in the output directory.

    python launchers/reproduce.py [--preset ds_configs/protocol_demo.yaml] [--out DIR] [--ablate [LOC ...]]
                                  [--section.key=value ...]

Pre-training runs through the `deepspeed` runner as a user runs it (the preset's `deepspeed` arguments), one
OpenMP thread per rank unless OMP_NUM_THREADS is set. Probes and fine-tunings (launchers/probe.py,
launchers/finetune.py) run side by side, one per device slot (the preset's `jobs`: one per GPU by default, on CPU
one), each pinned to its share of the cores; the slots change no result. Rerunning skips finished stages and resumes an interrupted
one; a stage whose settings changed runs again, and so does everything after it. `--ablate` adds one TCD run per
relation location (all enabled ones, or those named) with that location off. Exit status: 2 for an invalid
preset, 1 for a failed stage (its log is named).
"""

import argparse
import sys
import time
from pathlib import Path

from tcd_ds.protocol.plan import stages
from tcd_ds.protocol.plots import write_plots
from tcd_ds.protocol.preset import load_preset
from tcd_ds.protocol.report import gather, write_report
from tcd_ds.protocol.slots import make_slots
from tcd_ds.protocol.stages import StageFailed, minutes, run_stages
from tcd_ds.rundir import RunDir
from tcd_ds.spec import RELATION_LOCATIONS, SpecError
from tcd_ds.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(REPO / "ds_configs" / "protocol_demo.yaml"))
    parser.add_argument("--out", help="output directory (default: the preset's out_dir)")
    parser.add_argument("--ablate", nargs="*", choices=RELATION_LOCATIONS, default=None,
                        help="drop one relation location at a time: the ones named, or every enabled one")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        preset = load_preset(args.preset, overrides, args.ablate)
    except (SpecError, ValueError) as e:
        print(f"invalid protocol preset {args.preset}:", file=sys.stderr)
        for line in str(e).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 2
    out = Path(args.out or preset.out_dir)
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
