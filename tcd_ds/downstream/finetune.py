"""Fine-tuning one converted model on one task over several seeds: plain PyTorch, one process, any device.

Per seed: a fresh classifier on the pre-trained encoder (full fine-tuning, or adapters with the encoder frozen),
AdamW with linear warm-up and decay, a dev evaluation after each epoch, and the weights of the epoch with the best
dev score (the task's first metric) evaluated on every evaluation split (test, when the task has one).

For an MoE model the loss is the task loss plus `balance_weight * balance loss`, as in pre-training (the model's
own `loss`, HF's MoE convention): the weight is the model's own (`config.balance_weight`, from the run spec)
unless `FinetuneConfig.balance_weight` overrides it (0 turns it off).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
)

from tcd_ds.models import register_auto_classes

from tcd_ds.downstream.adapters import add_adapters
from tcd_ds.downstream.metrics import compute
from tcd_ds.downstream.tasks import Example, Task

Batch = dict[str, torch.Tensor]


@dataclass
class FinetuneConfig:
    mode: Literal["full", "adapter"] = "full"
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    max_length: int = 128
    adapter_size: int = 64
    balance_weight: float | None = None  # None: the MoE model's config.balance_weight
    max_train_examples: int | None = None  # a fixed random subset (the same for every model and seed), for speed


def encode(tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_length: int) -> list[dict]:
    """Token ids of each example (a single sentence, or a pair with segment ids), truncated to `max_length`."""
    columns = list(zip(*(e.texts for e in examples)))
    encoded = tokenizer(*columns, truncation=True, max_length=max_length, return_token_type_ids=len(columns) == 2)
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": e.label} for i, e in enumerate(examples)]


def collate(tokenizer: PreTrainedTokenizerBase, rows: list[dict], regression: bool, device: torch.device) -> Batch:
    features = [{k: v for k, v in row.items() if k != "labels"} for row in rows]
    batch = tokenizer.pad(features, return_tensors="pt")
    batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.float if regression else torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """A random epoch in batches of similar lengths, which saves most of the padding: shuffle, sort each run of
    50 batches' worth of examples by length, cut batches, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def load_classifier(model_dir: str | Path, task: Task, config: FinetuneConfig, device: torch.device) -> PreTrainedModel:
    regression = task.spec.kind == "regression"
    register_auto_classes()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=task.spec.num_labels,
        problem_type="regression" if regression else "single_label_classification",
    )
    if config.mode == "adapter":
        add_adapters(model, config.adapter_size)
    return model.to(device)


@torch.no_grad()
def predict(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], config: FinetuneConfig,
            regression: bool, device: torch.device) -> list[float]:
    """Predictions in the order of `rows` (computed in order of length, to pad little)."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    predictions = [0.0] * len(rows)
    for start in range(0, len(rows), config.eval_batch_size):
        picked = order[start : start + config.eval_batch_size]
        batch = collate(tokenizer, [rows[i] for i in picked], regression, device)
        batch.pop("labels")
        logits = model(**batch).logits.float()
        for i, value in zip(picked, (logits.squeeze(-1) if regression else logits.argmax(dim=-1)).tolist()):
            predictions[i] = value
    model.train()
    return predictions


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], task: Task,
             config: FinetuneConfig, device: torch.device) -> dict[str, float]:
    regression = task.spec.kind == "regression"
    predictions = predict(model, tokenizer, rows, config, regression, device)
    return compute(task.spec.metrics, predictions, [row["labels"] for row in rows])


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    )


def train_one_seed(model_dir: str | Path, task: Task, config: FinetuneConfig, seed: int, device: torch.device,
                   tokenizer: PreTrainedTokenizerBase, encoded: dict[str, list[dict]]) -> dict:
    """Train for `config.epochs`, evaluating dev after each; then every evaluation split at the best dev epoch."""
    torch.manual_seed(seed)  # the new head's initialisation and dropout
    model = load_classifier(model_dir, task, config, device)
    regression = task.spec.kind == "regression"
    if config.balance_weight is not None and model.config.model_type == "moe_bert":
        model.config.balance_weight = config.balance_weight
    balance_weight = getattr(model.config, "balance_weight", 0.0)
    with_balance = model.config.model_type == "moe_bert" and balance_weight > 0
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    train_rows = encoded["train"]
    lengths = [len(row["input_ids"]) for row in train_rows]
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_rows) // config.batch_size)
    scheduler = linear_schedule(optimizer, steps_per_epoch * config.epochs, config.warmup_ratio)

    epochs, best_state = [], None
    model.train()
    for epoch in range(config.epochs):
        sums = {"loss": 0.0, "balance": 0.0}
        for batch_rows in length_bucketed_batches(lengths, config.batch_size, generator):
            batch = collate(tokenizer, [train_rows[i] for i in batch_rows], regression, device)
            out = model(**batch)
            loss = out.loss
            if with_balance:
                sums["balance"] += out.aux_loss.item()
                sums["loss"] += (loss - balance_weight * out.aux_loss).item()  # the task loss, as before
            else:
                sums["loss"] += loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            scheduler.step()
        record = {"epoch": epoch + 1, "train_loss": sums["loss"] / steps_per_epoch}
        if with_balance:
            record["train_balance_loss"] = sums["balance"] / steps_per_epoch
        record["dev"] = evaluate(model, tokenizer, encoded["dev"], task, config, device)
        epochs.append(record)
        if max(epochs, key=lambda r: r["dev"][task.main_metric]) is record:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    best = max(epochs, key=lambda r: r["dev"][task.main_metric])
    scores = {"dev": best["dev"]}
    for split in task.eval_splits():
        if split != "dev":
            scores[split] = evaluate(model, tokenizer, encoded[split], task, config, device)
    return {"seed": seed, "best_epoch": best["epoch"], "scores": scores, "epochs": epochs,
            "balance_weight": balance_weight if with_balance else None}


def summarise(runs: list[dict], task: Task) -> dict[str, dict[str, dict[str, float]]]:
    """Per evaluation split and metric: mean, sample standard deviation (0 for one seed), min and max."""
    summary: dict = {}
    for split in task.eval_splits():
        for metric in task.spec.metrics:
            scores = [run["scores"][split][metric] for run in runs]
            summary.setdefault(split, {})[metric] = {
                "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "min": min(scores), "max": max(scores),
            }
    return summary


def finetune(model_dir: str | Path, task: Task, config: FinetuneConfig, seeds: list[int],
             device: torch.device, log=print) -> dict:
    """Fine-tune `model_dir` on `task` once per seed; the result is what `launchers/finetune.py` writes as JSON."""
    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_length = min(config.max_length, AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings)
    examples = dict(task.splits)
    if config.max_train_examples is not None and config.max_train_examples < len(examples["train"]):
        subset = torch.randperm(len(examples["train"]), generator=torch.Generator().manual_seed(0))
        examples["train"] = [examples["train"][i] for i in sorted(subset[: config.max_train_examples].tolist())]
    encoded = {split: encode(tokenizer, rows, max_length) for split, rows in examples.items()}
    runs = []
    for seed in seeds:
        run = train_one_seed(model_dir, task, config, seed, device, tokenizer, encoded)
        runs.append(run)
        log(f"[finetune] {task.spec.name} {config.mode} seed {seed}: best epoch {run['best_epoch']}, "
            + ", ".join(f"{s} {m} {v:.4f}" for s, scores in run["scores"].items() for m, v in scores.items()))
    split = "test" if "test" in task.splits else "dev"
    return {
        "model": str(model_dir), "task": task.spec.name, "mode": config.mode, "seeds": seeds,
        "metrics": task.spec.metrics, "main_metric": task.main_metric, "report_split": split,
        "config": asdict(config), "summary": summarise(runs, task), "runs": runs,
    }
