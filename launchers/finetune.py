"""Fine-tune a converted model (tools/convert_to_hf.py) on a downstream task, over several seeds; results as JSON.

    python launchers/finetune.py HF_DIR --task data/tasks/movie_reviews [--mode full|adapter] [--seeds 1 2 3]
    python launchers/finetune.py HF_DIR --task sst2          # a GLUE task by name, through `datasets` (online)

HF_DIR is a teacher (plain BERT) or an MoE student directory; for an MoE model the load-balancing loss stays in
the fine-tuning loss with the run's `balance_weight` unless --balance-weight says otherwise (0: off). Training is
`transformers.Trainer`'s, in one process on one device: DeepSpeed's accelerator (CUDA if present, in bf16, on the
first visible GPU; else CPU, in fp32). The reported epoch is the best on a slice held out from train (--selection
heldout), the best on dev (dev) or the last (last). The defaults suit the model sizes we ship (H 64-128); for
BERT-base use --lr 2e-5 to 5e-5 and --epochs 3. Exit status 2: the task could not be loaded.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from tcd_ds.downstream.finetune import FinetuneConfig, finetune
from tcd_ds.downstream.tasks import TaskError, load_task


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Hugging Face directory written by tools/convert_to_hf.py")
    parser.add_argument("--task", required=True, help="a task directory with task.yaml, or a GLUE task name")
    parser.add_argument("--mode", choices=["full", "adapter"], default=defaults.mode)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--adapter-size", type=int, default=defaults.adapter_size, help="adapter bottleneck width")
    parser.add_argument("--balance-weight", type=float, default=None,
                        help="weight of the MoE load-balancing loss (default: the model's, from its run spec)")
    parser.add_argument("--max-train-examples", type=int, default=None,
                        help="train on a fixed random subset of this size (the same for every model and seed)")
    parser.add_argument("--selection", choices=["heldout", "dev", "last"], default=defaults.selection,
                        help="which epoch is reported: best on a held-out slice of train, best on dev, or the last")
    parser.add_argument("--heldout-fraction", type=float, default=defaults.heldout_fraction,
                        help="share of train held out for --selection heldout")
    parser.add_argument("--heldout-max-examples", type=int, default=defaults.heldout_max_examples)
    parser.add_argument("--eval-capacity-factor", type=float, default=None,
                        help="MoE: expert capacity factor in evaluation (default: the model's)")
    parser.add_argument("--freeze-router", action="store_true", help="MoE: keep the pre-trained router (gate) fixed")
    parser.add_argument("--report-to", nargs="*", default=[], help="Trainer integrations, e.g. wandb (default none)")
    parser.add_argument("--out", help="results JSON (default: runs/finetune/<model>_<task>_<mode>.json)")
    return parser.parse_args(argv)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, max_length=args.max_length, adapter_size=args.adapter_size,
        balance_weight=args.balance_weight, max_train_examples=args.max_train_examples, selection=args.selection,
        heldout_fraction=args.heldout_fraction, heldout_max_examples=args.heldout_max_examples,
        eval_capacity_factor=args.eval_capacity_factor, train_router=not args.freeze_router, report_to=args.report_to,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task = load_task(args.task)
    except TaskError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    try:
        config = finetune_config(args)
    except ValueError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    device = torch.device(get_accelerator().current_device_name())
    results = finetune(args.model, task, config, args.seeds, device)
    out = Path(args.out or f"runs/finetune/{Path(args.model).name}_{task.spec.name}_{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    split, metric = results["report_split"], results["main_metric"]
    stats = results["summary"][split][metric]
    print(f"{task.spec.name} {args.mode}: {split} {metric} {stats['mean']:.4f} +- {stats['std']:.4f} over "
          f"{len(args.seeds)} seed(s), {results['selection_rule']}; wrote {out}")
    if results["constant_prediction_seeds"]:
        print(f"WARNING: constant predictions on {split} for seed(s) {results['constant_prediction_seeds']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
