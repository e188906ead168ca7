"""The training loop: spec -> built components -> DeepSpeed engine -> steps, evals, checkpoints, logs."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from tcd_ds.data.loader import MLMBatches, PrefetchingBatches, validation_batches
from tcd_ds.data.prepare import prepare_data
from tcd_ds.ds_config import deepspeed_config
from tcd_ds.models import build_model, moe_param_groups
from tcd_ds.spec import RunSpec, dump_spec
from tcd_ds.train import checkpoint
from tcd_ds.train.engine import DistillationEngine
from tcd_ds.train.metrics import MetricsLog
from tcd_ds.train.optim import build_optimizer, build_scheduler
from tcd_ds.train.stop import StopRequest
from tcd_ds.train.wandb_run import open_wandb


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout and gate noise draw from torch's global RNG; seeding it from (seed, step, rank) makes a resumed
    run draw exactly what an uninterrupted one would, with no RNG state to save."""
    torch.manual_seed((seed * 1_000_003 + step) * 4096 + rank)


def build_data(spec: RunSpec, rank: int, world_size: int):
    data = prepare_data(spec.data)  # a cache hit: Trainer built it before the process group existed
    train_batches = PrefetchingBatches(
        MLMBatches(
            data.train, data.tokenizer, spec.train.global_batch_size, spec.train.micro_batch_size,
            rank, world_size, spec.seed, spec.data.mask_prob,
        ),
        pin_memory=get_accelerator().device_name() == "cuda",
    )
    val_batches = validation_batches(
        data.validation, data.tokenizer, spec.train.micro_batch_size, spec.train.eval_batches, rank, world_size,
        spec.seed, spec.data.mask_prob,
    )
    return data.tokenizer, train_batches, val_batches, data.train_stats


@torch.no_grad()
def evaluate(engine, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Validation MLM loss and accuracy over masked tokens, pooled across ranks."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss sum, correct, masked tokens
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked = batch["labels"] != -100
        labels = batch["labels"][masked]
        picked = logits[masked].float()
        sums[0] += torch.nn.functional.cross_entropy(picked, labels, reduction="sum").double()
        sums[1] += (picked.argmax(-1) == labels).sum()
        sums[2] += masked.sum()
    dist.all_reduce(sums)
    engine.train()
    count = max(sums[2].item(), 1.0)
    return {"val/loss/mlm": sums[0].item() / count, "val/accuracy": sums[1].item() / count}


def expert_load(model) -> dict[str, list[float]]:
    """Per MoE layer, the fraction of the global batch's tokens whose top-1 choice is each expert."""
    blocks = model.moe_blocks()
    counts = torch.stack([block.expert_counts.float() for block in blocks.values()])
    dist.all_reduce(counts)
    fractions = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return {f"moe/load/layer_{i}": f.tolist() for i, f in zip(blocks, fractions)}


def pooled_mean(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each loss term over the log window and over data-parallel ranks: one all-reduce per log."""
    names = sorted(window[0])
    stacked = torch.stack([torch.stack([torch.as_tensor(w[n], dtype=torch.float32) for n in names]) for w in window])
    means = stacked.mean(0)
    dist.all_reduce(means)
    means /= dist.get_world_size()
    return {f"loss/{n}": v for n, v in zip(names, means.tolist())}


class NonFiniteTraining(RuntimeError):
    """Training diverged: too many consecutive steps were skipped for NaN/Inf."""


def rank0_spec(spec: RunSpec, rank: int) -> RunSpec:
    """Every rank runs rank 0's resolved spec. Ranks resolve it from their own environment, and on a multi-node
    job a sweep agent's parameters and trial run dir (WANDB_*) exist on its own node only."""
    box = [spec.model_dump(mode="json")]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] != spec.model_dump(mode="json"):
        print(f"[tcd-ds] rank {rank}: the run spec resolved here differs from rank 0's (sweep parameters given on "
              "another node?); running rank 0's", flush=True)
        return RunSpec.model_validate(box[0])
    return spec


def unlink_shm_comm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one machine) maps one /dev/shm buffer per rank, 66 MB each, and
    never unlinks it: every CPU launch would leave its buffers in RAM. Once every rank has mapped every buffer
    (init_distributed has returned on all ranks: the barrier), each rank unlinks its own name; the mappings stay
    valid and the memory goes when the processes exit, however they exit."""
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


class Trainer:
    """A run's components, built from the spec in data-flow order; `fit()` runs the loop."""

    def __init__(self, spec: RunSpec):
        prepare_data(spec.data)  # before any collective: tokenizing a corpus may outlast the collectives' timeout
        accelerator = get_accelerator()
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            timeout=timedelta(minutes=spec.parallel.timeout_minutes),
            verbose=False,
        )
        self.rank, world_size = dist.get_rank(), dist.get_world_size()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.spec = spec = rank0_spec(spec, self.rank)
        unlink_shm_comm_buffer(self.rank)
        self.run_dir = Path(spec.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "spec.yaml").write_text(dump_spec(spec))

        self.tokenizer, self.train_batches, self.val_batches, data_stats = build_data(spec, self.rank, world_size)
        if self.rank == 0:
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
            if data_stats.get("skipped_lines"):
                print(f"[tcd-ds] skipped {data_stats['skipped_lines']} undecodable line(s) in data.train")

        torch.manual_seed(spec.seed + self.rank)  # distinct experts per rank; DeepSpeed broadcasts shared weights
        self.model = build_model(spec.model, vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id)
        optimizer = build_optimizer(
            moe_param_groups(self.model, spec.optim.weight_decay), spec.optim, accelerator.device_name()
        )
        self.scheduler = build_scheduler(optimizer, spec.optim, spec.train.steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(spec, world_size),
        )
        self.distillation = None
        if spec.distill is not None:
            from tcd_ds.distill.distillation import Distillation

            self.distillation = Distillation.build(spec, self.model, self.tokenizer, self.engine.device, self.rank)
        self.step_engine = DistillationEngine(self.engine, spec, self.distillation)
        self.layout = {"world_size": world_size, "ep_size": spec.model.moe.ep_size if spec.model.moe else 1}
        resumed = checkpoint.resume(self.engine, self.run_dir, self.layout)
        self.start_step = resumed.get("step", 0)
        global_batch = spec.train.global_batch_size
        consumed = resumed.get("consumed_samples", self.start_step * global_batch)
        self.train_batches.first_sample = consumed - self.start_step * global_batch
        if resumed.get("elastic"):
            self.scheduler.last_epoch = self.start_step - 1
            self.scheduler.step()  # the schedule continues where the checkpoint left it
        self.wandb = open_wandb(spec, resumed.get("wandb_run_id")) if self.rank == 0 else None

    def fit(self) -> None:
        spec, rank, engine = self.spec, self.rank, self.engine
        start = self.start_step
        end = min(spec.train.steps, start + (spec.train.steps_per_launch or spec.train.steps))
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", start) if rank == 0 else None
        if rank == 0 and start:
            print(f"[tcd-ds] resumed from {checkpoint.checkpoint_dir(self.run_dir) / checkpoint.tag_for(start)}")
        tokens_per_step = spec.train.global_batch_size * spec.data.seq_len
        progress = tqdm(total=end, initial=start, disable=rank != 0 or not spec.logging.progress_bar, desc="train")
        window, window_start, last_saved = [], time.perf_counter(), start
        stop = StopRequest()
        skipped_in_a_row = 0

        for step in range(start, end):
            seed_step(spec.seed, step, rank)
            skipped_before = engine.skipped_steps
            window.append(self.step_engine.step(self.train_batches.micro_batches(step), step))
            done = step + 1
            # DeepSpeed's ZeRO optimizer skips a step whose gradient norm is NaN/Inf (the same verdict on every
            # rank); we count them, and stop when they do not recover.
            skipped_in_a_row = skipped_in_a_row + 1 if engine.skipped_steps > skipped_before else 0
            if skipped_in_a_row and rank == 0:
                print(f"[tcd-ds] step {done}: non-finite loss or gradients, step skipped ({skipped_in_a_row} in a row)")
            if skipped_in_a_row >= spec.train.max_skipped_steps:
                raise NonFiniteTraining(
                    f"{skipped_in_a_row} steps in a row had non-finite losses or gradients (train.max_skipped_steps="
                    f"{spec.train.max_skipped_steps}); stopped at step {done}, last good checkpoint: step {last_saved}"
                )
            log_now, eval_now = done % spec.logging.every == 0 or done == end, done % spec.train.eval_every == 0
            if log_now or eval_now:
                record = {"step": done, **pooled_mean(window), "lr": self.scheduler.get_last_lr()[0],
                          "skipped_steps": engine.skipped_steps}
                record["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
                record["tokens_per_s"] = tokens_per_step * len(window) / (time.perf_counter() - window_start)
                if spec.model.moe is not None:
                    record.update(expert_load(self.model))
                if eval_now or done == spec.train.steps:
                    record.update(evaluate(engine, self.val_batches))
                if metrics:
                    metrics.write(record)
                if self.wandb:
                    self.wandb.write(record)
                progress.set_postfix(loss=f"{record['loss/mlm']:.3f}")
                window, window_start = [], time.perf_counter()
            progress.update(1)
            if done % spec.checkpoint.every == 0 or done == end:
                state = {"consumed_samples": self.train_batches.first_sample + done * spec.train.global_batch_size}
                if self.wandb:
                    state["wandb_run_id"] = self.wandb.run_id
                checkpoint.save(engine, self.run_dir, done, spec.checkpoint.keep_last, state, self.layout)
                last_saved = done
            # SIGTERM or a dead runner, on any rank: all stop after the same step, between saves. Asked at log
            # intervals only: the question is a collective that waits on the device.
            if log_now and stop.agreed(engine.device):
                break
        progress.close()
        if rank == 0:
            finished = last_saved >= spec.train.steps
            why = stop.reason or "train.steps_per_launch"
            print(f"[tcd-ds] {'finished' if finished else f'stopped ({why}); last checkpoint step {last_saved}'}; "
                  f"run dir {self.run_dir}")
        if self.wandb:
            self.wandb.finish()
        dist.barrier()


def train(spec: RunSpec) -> None:
    Trainer(spec).fit()
