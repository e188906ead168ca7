"""Fine-tune a converted model (`tcd-ds convert`) on a downstream task over several seeds; results as JSON.

    tcd-ds finetune HF_DIR --task movie_reviews [--mode adapter] [--seeds 1 2 3] [--key=value ...] [--dry-run]
    tcd-ds finetune --spec FINETUNE.yaml [--key=value ...]
    tcd-ds finetune HF_DIR --task sst2          # a GLUE task by name, through `datasets` (online)

Every setting is a field of the fine-tuning spec (`--print-schema` lists them with their defaults; the protocol
preset's `finetune` section takes the same ones). HF_DIR is a teacher (plain BERT) or an MoE student directory;
for an MoE model the load-balancing loss stays in the fine-tuning loss with the run's `balance_weight` unless
`--balance_weight` says otherwise (0: off). Training is `transformers.Trainer`'s, in one process on one device:
DeepSpeed's accelerator (CUDA if present, in bf16, on the first visible GPU; else CPU, in fp32). Exit status 2:
the spec, the model directory or the task cannot be used; nothing was trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tcd_ds.cli.common import start_model_command
from tcd_ds.downstream.spec import FinetuneSpec
from tcd_ds.spec import dump_spec


def main(argv: list[str] | None = None) -> int:
    from tcd_ds.downstream.tasks import TaskError, load_task

    started = start_model_command(sys.argv[1:] if argv is None else argv, __doc__, FinetuneSpec,
                                  "fine-tuning spec", lambda spec: load_task(spec.task), errors=(TaskError,))
    if isinstance(started, int):
        return started
    line, spec, task = started
    out = Path(spec.out or f"runs/finetune/{Path(spec.model).name}_{task.spec.name}_{spec.mode}.json")
    if "dry-run" in line.flags:
        print(dump_spec(spec), end="")
        print(f"# task {task.spec.name}: {', '.join(f'{s} {len(e)}' for s, e in task.splits.items())} examples; "
              f"results to {out}")
        return 0
    import torch
    from deepspeed.accelerator import get_accelerator

    from tcd_ds.downstream.finetune import finetune

    device = torch.device(get_accelerator().current_device_name())
    results = finetune(spec, task, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    split, metric = results["report_split"], results["main_metric"]
    stats = results["summary"][split][metric]
    print(f"{task.spec.name} {spec.mode}: {split} {metric} {stats['mean']:.4f} +- {stats['std']:.4f} over "
          f"{len(spec.seeds)} seed(s), {results['selection_rule']}; wrote {out}")
    if results["constant_prediction_seeds"]:
        print(f"WARNING: constant predictions on {split} for seed(s) {results['constant_prediction_seeds']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
