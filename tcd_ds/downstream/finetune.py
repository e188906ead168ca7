"""Fine-tuning one converted model on one task over several seeds, on `transformers.Trainer`.

Per seed: a fresh classifier on the pre-trained encoder (full fine-tuning, or adapters with the encoder frozen),
HF's AdamW (weight decay on weights only: no biases, no LayerNorm) with linear warm-up and decay, gradient
clipping, length-bucketed batches (`train_sampling_strategy="group_by_length"`), bf16 on a GPU and fp32 on CPU,
an evaluation after each epoch, and one epoch's weights (kept in memory, never written to disk) scored on every
evaluation split. Which epoch is `FinetuneSpec.selection` (tcd_ds/downstream/spec.py):

- `heldout` (default): the best score on a slice held out from train (fixed, the same for every model and seed;
  it is not trained on), so the reported splits never grade their own selection;
- `dev`: the best dev score (where a task has no test split, as GLUE, a max over epochs on the reported split);
- `last`: the last epoch.

For an MoE model the loss is the task loss plus `balance_weight * balance loss`, as in pre-training (the model's
own `loss`, HF's MoE convention): the weight is the model's own (`config.balance_weight`, from the run spec)
unless `FinetuneSpec.balance_weight` overrides it (0 turns it off). Each epoch records the loss trained on, the
task loss (recomputed from the logits) and the unweighted balance loss.

A run whose predictions on a split are all one class (or one value) says so loudly: in the log and in the
results (`constant_predictions`), which the protocol's table marks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, EvalPrediction,
    PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from tcd_ds.downstream.adapters import add_adapters
from tcd_ds.downstream.metrics import compute
from tcd_ds.downstream.spec import FinetuneSpec
from tcd_ds.downstream.stats import select_lr, summary
from tcd_ds.downstream.tasks import Example, Task
from tcd_ds.models import register_auto_classes

HELDOUT = "heldout"  # the name of the selection slice among the evaluated splits
ROUTER = ".gate.wg."  # the MoE gate's weight in a converted student (output.dense.deepspeed_moe.gate.wg.weight)


def encode(tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_length: int) -> list[dict]:
    """Token ids of each example (a single sentence, or a pair with segment ids), truncated to `max_length`."""
    columns = list(zip(*(e.texts for e in examples)))
    encoded = tokenizer(*columns, truncation=True, max_length=max_length, return_token_type_ids=len(columns) == 2)
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": e.label} for i, e in enumerate(examples)]


def collate(tokenizer: PreTrainedTokenizerBase, rows: list[dict], regression: bool, device: torch.device) -> dict:
    """One padded batch of encoded rows (what the Trainer's collator makes, on `device`)."""
    batch = DataCollatorWithPadding(tokenizer)(rows)
    batch["labels"] = batch["labels"].to(torch.float if regression else torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def split_train(examples: list[Example], config: FinetuneSpec) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out selection slice): fixed draws (seed 0) that depend only on the task and the
    config, so every model and seed sees the same ones. Without `heldout` selection nothing is held out."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    held = 0
    if config.selection == HELDOUT:
        held = min(config.heldout_max_examples, max(1, round(len(examples) * config.heldout_fraction)))
    heldout, pool = sorted(order[:held]), order[held:]
    if config.max_train_examples is not None and config.max_train_examples < len(pool):
        subset = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))[: config.max_train_examples]
        pool = [pool[i] for i in subset.tolist()]
    return [examples[i] for i in sorted(pool)], [examples[i] for i in heldout]


def load_classifier(model_dir: str | Path, task: Task, config: FinetuneSpec,
                    device: torch.device | None = None) -> PreTrainedModel:
    """The converted model with a new head; adapters, balance weight, eval capacity and router as configured."""
    regression = task.spec.kind == "regression"
    register_auto_classes()
    overrides = {}
    model_config = AutoConfig.from_pretrained(str(model_dir))
    if config.eval_capacity_factor is not None and hasattr(model_config, "eval_capacity_factor"):
        overrides["eval_capacity_factor"] = config.eval_capacity_factor
    if config.balance_weight is not None and hasattr(model_config, "balance_weight"):
        overrides["balance_weight"] = config.balance_weight
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=task.spec.num_labels,
        problem_type="regression" if regression else "single_label_classification", **overrides,
    )
    if config.mode == "adapter":
        add_adapters(model, config.adapter_size)
    if not config.train_router:
        for name, param in model.named_parameters():
            if ROUTER in name:
                param.requires_grad_(False)
    return model if device is None else model.to(device)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """The task's loss as BERT's classifier computes it (MSE for regression, cross-entropy otherwise)."""
    logits = logits.float()
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


class LossTally:
    """Per-epoch means of the loss trained on, the task loss and the balance loss (summed on the device)."""

    def __init__(self):
        self.sums, self.steps = None, 0

    def add(self, *values: torch.Tensor) -> None:
        stacked = torch.stack([v.detach().float() for v in values])
        self.sums = stacked if self.sums is None else self.sums + stacked
        self.steps += 1

    def pop(self) -> list[float]:
        means = [] if self.sums is None else (self.sums / self.steps).tolist()
        self.sums, self.steps = None, 0
        return means


class FinetuneTrainer(Trainer):
    """Trainer that tallies, per training batch, its loss, the task loss and the MoE balance loss, and evaluates in
    the split's order."""

    def __init__(self, *args, regression: bool, tally: LossTally, **kwargs):
        super().__init__(*args, **kwargs)
        self.regression, self.tally = regression, tally

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            aux = getattr(outputs, "aux_loss", None)
            self.tally.add(loss, task_loss(outputs.logits, inputs["labels"], self.regression),
                           torch.zeros((), device=loss.device) if aux is None else aux)
        return (loss, outputs) if return_outputs else loss

    def _get_eval_sampler(self, eval_dataset) -> SequentialSampler:
        """In order (HF groups eval batches by length too, in a seed's own order): predictions line up with the
        split's examples, the same for every model and seed, as the paired bootstrap needs."""
        return SequentialSampler(eval_dataset)


class EpochRecords(TrainerCallback):
    """Each epoch's losses and scores on the per-epoch splits; the trained weights of the best epoch on the
    selection split (None: the last epoch), kept in memory."""

    def __init__(self, tally: LossTally, splits: list[str], select_split: str | None, metric: str,
                 with_balance: bool, log):
        self.tally, self.splits, self.select_split, self.metric = tally, splits, select_split, metric
        self.with_balance, self.log = with_balance, log
        self.records: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, args, state, control, **kwargs):
        total, task, balance = self.tally.pop()
        record = {"epoch": round(state.epoch), "train_loss": task, "train_total_loss": total}
        if self.with_balance:
            record["train_balance_loss"] = balance
        self.records.append(record)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        record = self.records[-1]
        for split, scores in split_metrics(dict(metrics), self.splits).items():
            record[split] = {k: v for k, v in scores.items() if k != "constant"}
            record.setdefault("constant", {})[split] = bool(scores["constant"])
            if split == self.select_split and (self.best is None or scores[self.metric] > self.best[split][self.metric]):
                self.best = record
                self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if all(split in record for split in self.splits):
            self.log(f"[finetune]   epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
                     + (f" (balance {record['train_balance_loss']:.4f})" if self.with_balance else "") + ", "
                     + ", ".join(f"{s} {self.metric} {record[s][self.metric]:.4f}" for s in self.splits))

    def selected(self, model: PreTrainedModel) -> dict:
        """The selected epoch's record, with its weights put back into `model`."""
        if self.select_split is None or self.best is self.records[-1]:
            return self.records[-1]
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.best_state:
                    param.copy_(self.best_state[name])
        return self.best


def split_metrics(metrics: dict[str, float], splits: list[str]) -> dict[str, dict[str, float]]:
    """Trainer's `eval_<split>_<metric>` keys as {split: {metric: value}} for the named splits (the loss, timings
    and epoch left out)."""
    result: dict = {}
    for split in sorted(splits, key=len, reverse=True):  # dev_mismatched before dev
        prefix = f"eval_{split}_"
        for key in [k for k in metrics if k.startswith(prefix)]:
            metric = key.removeprefix(prefix)
            value = metrics.pop(key)
            if metric not in ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch"):
                result.setdefault(split, {})[metric] = value
    return result


def predicted_values(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """The model's answer per example: the value (regression) or the class with the largest logit."""
    logits = logits.float()
    return logits.reshape(-1) if regression else logits.argmax(dim=-1)


def report_split(task: Task) -> str:
    """The split the results report: test where the task has one, else dev (as GLUE)."""
    return "test" if "test" in task.splits else "dev"


def metrics_function(task: Task):
    """Trainer's `compute_metrics`: the task's metrics, plus `constant` (1.0 when every prediction is the same)."""
    regression = task.spec.kind == "regression"

    def metrics(prediction: EvalPrediction) -> dict[str, float]:
        predicted = predicted_values(torch.as_tensor(prediction.predictions), regression)
        scores = compute(task.spec.metrics, predicted.tolist(), torch.as_tensor(prediction.label_ids).tolist())
        constant = bool(predicted.max() - predicted.min() <= (1e-6 if regression else 0))
        return {**scores, "constant": float(constant)}

    return metrics


def training_arguments(config: FinetuneSpec, lr: float, seed: int, device: torch.device, output_dir: str,
                       run_name: str) -> TrainingArguments:
    """Evaluation every epoch, nothing saved (the selected epoch's weights stay in memory), no progress bars."""
    gpu = device.type == "cuda"
    args = TrainingArguments(
        output_dir=output_dir, run_name=run_name, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size, learning_rate=lr, weight_decay=config.weight_decay,
        lr_scheduler_type="linear", warmup_steps=config.warmup_ratio, max_grad_norm=config.grad_clip,
        seed=seed, data_seed=seed, bf16=gpu and torch.cuda.is_bf16_supported(), use_cpu=not gpu,
        train_sampling_strategy="group_by_length", eval_strategy="epoch", save_strategy="no",
        logging_strategy="epoch" if config.report_to else "no", report_to=config.report_to or "none", disable_tqdm=True, log_level="error",
        dataloader_pin_memory=gpu, optim="adamw_torch_fused" if gpu else "adamw_torch",
    )
    if gpu and args.n_gpu > 1:
        args._n_gpu = 1  # one device per process (as Trainer does for model parallelism), never DataParallel
    return args


def make_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, config: FinetuneSpec,
                 seed: int, device: torch.device, output_dir: str, train_rows: list[dict],
                 eval_sets: dict[str, list[dict]], tally: LossTally, callbacks: list[TrainerCallback] = (),
                 lr: float | None = None):
    """The Trainer of one seed at one learning rate (default: the grid's first): HF's optimizer (decay on weights
    only), schedule, sampler and evaluation loop."""
    lr = config.lr_for(config.mode)[0] if lr is None else lr
    trainer = FinetuneTrainer(
        model=model, args=training_arguments(config, lr, seed, device, output_dir,
                                             f"{task.spec.name}_lr{lr:g}_seed{seed}"),
        train_dataset=train_rows, eval_dataset=eval_sets, processing_class=tokenizer,
        compute_metrics=metrics_function(task), callbacks=list(callbacks), regression=task.spec.kind == "regression",
        tally=tally,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def train_one_seed(model_dir: str | Path, task: Task, config: FinetuneSpec, lr: float, seed: int,
                   device: torch.device, tokenizer: PreTrainedTokenizerBase, encoded: dict[str, list[dict]],
                   log=print) -> dict:
    """Train for `config.epochs`, evaluating after each; then every evaluation split at the selected epoch, and
    the predictions on the reported split (for the paired bootstrap, tcd_ds/downstream/stats.py)."""
    set_seed(seed)  # the new head's initialisation; Trainer seeds dropout and the batch order
    model = load_classifier(model_dir, task, config)
    moe = hasattr(model.config, "balance_weight")
    balance_weight = model.config.balance_weight if moe else 0.0
    with_balance = moe and balance_weight > 0
    select_split = {"heldout": HELDOUT, "dev": "dev", "last": None}[config.selection]
    per_epoch = ([HELDOUT] if select_split == HELDOUT else []) + ["dev"]
    tally = LossTally()
    records = EpochRecords(tally, per_epoch, select_split, task.main_metric, with_balance, log)
    ignore = ["aux_loss", "hidden_states", "attentions"]  # outputs that are not predictions
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(model, tokenizer, task, config, seed, device, output_dir, encoded["train"],
                               {s: encoded[s] for s in per_epoch}, tally, [records], lr)
        trainer.train(ignore_keys_for_eval=ignore)
        trainer.remove_callback(records)
        best = records.selected(model)
        rest = [s for s in task.eval_splits() if s not in per_epoch]
        final = split_metrics(trainer.evaluate({s: encoded[s] for s in rest}, ignore_keys=ignore), rest) \
            if rest else {}
        output = trainer.predict(encoded[report_split(task)], ignore_keys=ignore).predictions
        predictions = predicted_values(torch.as_tensor(output), task.spec.kind == "regression").tolist()
        if "wandb" in config.report_to:  # one W&B run per seed: HF's callback would log the next seed into this one
            import wandb

            wandb.finish()
    scores = {s: best[s] for s in task.eval_splits() if s in best}
    constant = {s: best["constant"][s] for s in scores}
    for split, values in final.items():
        scores[split] = {k: v for k, v in values.items() if k != "constant"}
        constant[split] = bool(values["constant"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"lr": lr, "seed": seed, "best_epoch": best["epoch"], "scores": scores, "epochs": records.records,
            "heldout": best.get(HELDOUT, {}).get(task.main_metric), "predictions": predictions,
            "balance_weight": balance_weight if with_balance else None,
            "constant_predictions": sorted(s for s, c in constant.items() if c),
            "trainable_parameters": trainable, "parameters": sum(p.numel() for p in model.parameters())}


SELECTION_RULES = {
    "heldout": "the epoch with the best {metric} on a held-out slice of train ({n} examples, not trained on)",
    "dev": "the epoch with the best dev {metric}",
    "last": "the last epoch",
}


def finetune(config: FinetuneSpec, task: Task, device: torch.device, log=print) -> dict:
    """Fine-tune `config.model` on `task` once per learning rate of the grid and seed; the result is what
    `tcd-ds finetune` writes as JSON (`grid_result`)."""
    model_dir = config.model
    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_length = min(config.max_length, AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings)
    examples = dict(task.splits)
    examples["train"], heldout = split_train(examples["train"], config)
    if heldout:
        examples[HELDOUT] = heldout
    encoded = {split: encode(tokenizer, rows, max_length) for split, rows in examples.items()}
    runs = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" warning, once per seed
    hf_logging.disable_progress_bar()  # "Loading weights", once per seed
    name = f"[finetune] {task.spec.name} {config.mode}"
    for lr in config.lr_for(config.mode):
        for seed in config.seeds:
            log(f"{name} lr {lr:g} seed {seed}: {len(encoded['train'])} training examples")
            run = train_one_seed(model_dir, task, config, lr, seed, device, tokenizer, encoded, log)
            runs.append(run)
            log(f"{name} lr {lr:g} seed {seed}: selected epoch {run['best_epoch']}, "
                + ", ".join(f"{s} {m} {v:.4f}" for s, scores in run["scores"].items() for m, v in scores.items()))
            if run["constant_predictions"]:
                log(f"{name} WARNING: lr {lr:g} seed {seed} predicts "
                    f"{'one value' if task.spec.kind == 'regression' else 'one class'} for every example of "
                    f"{', '.join(run['constant_predictions'])}: it learnt nothing from the input (try another lr or "
                    "more epochs)")
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()
    split = report_split(task)
    header = {
        "model": str(model_dir), "task": task.spec.name, "mode": config.mode, "metrics": task.spec.metrics,
        "main_metric": task.main_metric, "report_split": split, "selection": config.selection,
        "selection_rule": SELECTION_RULES[config.selection].format(metric=task.main_metric, n=len(heldout)),
        "heldout_examples": len(heldout), "train_examples": len(encoded["train"]),
        "labels": [row["labels"] for row in encoded[split]], "config": config.model_dump(mode="json"),
    }
    return grid_result(header, runs)


def grid_result(header: dict, runs: list[dict]) -> dict:
    """The result of runs over a grid of learning rates and seeds: every run (`all_runs`), each lr's held-out and
    reported scores over seeds (`lr_grid`, kept for the record: only the held-out ones select), and the selected
    lr's runs and summary, which alone are reported (`runs`, `summary`). Also how the protocol merges its one-lr,
    one-seed jobs (`merge_results`)."""
    lrs = list(dict.fromkeys(run["lr"] for run in runs))
    seeds = list(dict.fromkeys(run["seed"] for run in runs))
    heldout = {lr: [run["heldout"] for run in runs if run["lr"] == lr] for lr in lrs}
    selected = select_lr(heldout) if len(lrs) > 1 else lrs[0]
    chosen = [run for run in runs if run["lr"] == selected]
    split = header["report_split"]
    main = header["main_metric"]
    return {
        **header, "lrs": lrs, "seeds": seeds, "selected_lr": selected,
        "lr_grid": {f"{lr:g}": {"heldout": None if None in heldout[lr] else summary(heldout[lr]),
                                split: summary([run["scores"][split][main] for run in runs if run["lr"] == lr])}
                    for lr in lrs},
        "constant_prediction_seeds": [run["seed"] for run in chosen if split in run["constant_predictions"]],
        "summary": {s: {m: summary([run["scores"][s][m] for run in chosen]) for m in header["metrics"]}
                    for s in chosen[0]["scores"]},
        "runs": chosen, "all_runs": runs,
    }


def merge_results(results: list[dict]) -> dict:
    """Results of the same model, task and mode run as separate jobs (per lr and seed), as one result."""
    header = {k: v for k, v in results[0].items() if k not in GRID_KEYS}
    return grid_result(header, [run for result in results for run in result["all_runs"]])


GRID_KEYS = ("lrs", "seeds", "selected_lr", "lr_grid", "constant_prediction_seeds", "summary", "runs", "all_runs")
