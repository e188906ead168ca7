"""The training loop: spec -> built components -> DeepSpeed engine -> steps; the components own their cadence
(metrics logger, validation, checkpointer, non-finite guard, stop request), so the loop reads as what happens in
a step."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from tcd_ds.data.loader import MLMBatches, PrefetchingBatches, validation_batches
from tcd_ds.data.prepare import prepare_data
from tcd_ds.distill.tcd import TCD
from tcd_ds.models.batched_experts import accept_per_expert_zero_shards
from tcd_ds.models.build import build_model
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.rundir import RunDir
from tcd_ds.rundir.layout import tokenizer_fingerprint
from tcd_ds.rundir.relaunch import RelaunchRefused, plan_relaunch
from tcd_ds.spec import RunSpec, dump_spec
from tcd_ds.train.checkpoint import Checkpointer
from tcd_ds.train.device import prepare_device
from tcd_ds.train.ds_config import deepspeed_config
from tcd_ds.train.evaluation import Validation
from tcd_ds.train.faults import agree, attempt
from tcd_ds.train.guard import NonFiniteGuard
from tcd_ds.train.metrics import MetricsLog, MetricsLogger
from tcd_ds.train.optim import build_optimizer, build_scheduler
from tcd_ds.train.routing import routing_record
from tcd_ds.train.step import TrainStep
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

    def __init__(self, spec: RunSpec, restart: bool = False):
        prepare_data(spec.data)  # before any collective: tokenizing a corpus may outlast the collectives' timeout
        accelerator = get_accelerator()
        prepare_device(accelerator.device_name(), spec.train.deterministic)  # before any CUDA work
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(),
            timeout=timedelta(minutes=spec.parallel.timeout_minutes),
            verbose=False,
        )
        self.rank, world_size = dist.get_rank(), dist.get_world_size()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.spec = spec = rank0_spec(spec, self.rank)
        unlink_shm_comm_buffer(self.rank)
        self.run_dir = RunDir(spec.run_dir)
        self.tokenizer, self.train_batches, val_batches, data_stats = build_data(spec, self.rank, world_size)
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.open_run_dir(spec, fingerprint, restart)
        if self.rank == 0 and data_stats.get("skipped_lines"):
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
        if spec.model.moe is not None:
            accept_per_expert_zero_shards(self.engine.optimizer)  # checkpoints from before the packed experts
        tcd = TCD.build(spec, self.model, self.tokenizer, self.engine.device) if spec.distill else None
        self.train_step = TrainStep(self.engine, tcd, spec.seed, self.rank)

        identity = {"world_size": world_size, "ep_size": spec.model.moe.ep_size if spec.model.moe else 1,
                    "tokenizer": fingerprint}
        self.checkpointer = Checkpointer(self.engine, self.run_dir, spec.checkpoint.every, spec.checkpoint.keep_last,
                                         identity, dump_spec(spec))
        self.resumed = resumed = self.checkpointer.resume()
        global_batch = spec.train.global_batch_size
        consumed = resumed.consumed_samples if resumed.consumed_samples is not None else resumed.step * global_batch
        self.train_batches.first_sample = consumed - resumed.step * global_batch
        if resumed.elastic:
            self.scheduler.last_epoch = resumed.step - 1
            self.scheduler.step()  # the schedule continues where the checkpoint left it

        self.wandb = open_wandb(spec, resumed.wandb_run_id) if self.rank == 0 else None
        writers, problem = [self.wandb] if self.wandb else [], None
        if self.rank == 0:  # MetricsLog reads the file back to the resumed step: a fault here ends every rank
            problem = attempt(lambda: writers.append(MetricsLog(self.run_dir.metrics_file, resumed.step)),
                              self.run_dir.metrics_file)
        agree(problem, self.checkpointer.last_complete())
        self.logger = MetricsLogger(spec.logging.every, global_batch * spec.data.seq_len, writers)
        self.validation = Validation(val_batches, spec.train.eval_every, spec.train.steps)
        self.guard = NonFiniteGuard(self.engine, spec.train.max_skipped_steps, self.log)

    def open_run_dir(self, spec: RunSpec, fingerprint: str, restart: bool) -> None:
        """Rank 0 decides whether this launch may continue the run directory (tcd_ds.rundir.relaunch) before
        anything is written; every rank then raises the same RelaunchRefused, or rank 0 writes the spec, its
        history and the tokenizer, and every rank agrees on whether that worked."""
        verdict = [None]
        if self.rank == 0:
            try:
                verdict = [plan_relaunch(self.run_dir, spec.model_dump(mode="json"), fingerprint, restart)]
            except RelaunchRefused as e:
                verdict = [e]
        dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], RelaunchRefused):
            raise verdict[0]
        problem = None
        if self.rank == 0:
            for line in verdict[0].continued:
                print(f"[tcd-ds] continuing {self.run_dir.path} under a changed spec: {line}", flush=True)

            def write():
                verdict[0].apply(dump_spec(spec))
                self.tokenizer.save_pretrained(self.run_dir.tokenizer_dir)
            problem = attempt(write, self.run_dir.path)
        sealed = self.run_dir.newest_sealed() if not restart else None
        agree(problem, sealed.dir if sealed else None)

    def log(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def step_record(self, step: int) -> dict:
        """The logged record of `step`: the window's losses and throughput, optimizer and MoE state, and the
        validation when it is due (collectives: every rank calls it)."""
        record = {**self.logger.record(step), "lr": self.scheduler.get_last_lr()[0],
                  "skipped_steps": self.engine.skipped_steps,
                  "grad_norm": float(self.engine.get_global_grad_norm() or 0.0)}
        if self.spec.model.moe is not None:
            record.update(routing_record(self.model))
        if self.validation.should_run(step):
            record.update(self.validation(self.engine))
        return record

    def checkpoint_state(self, step: int) -> dict:
        """What a resume needs besides DeepSpeed's own state."""
        state = {"consumed_samples": self.train_batches.first_sample + step * self.spec.train.global_batch_size}
        if self.wandb:
            state["wandb_run_id"] = self.wandb.run_id
        return state

    def fit(self) -> None:
        spec, start = self.spec, self.resumed.step
        end = min(spec.train.steps, start + (spec.train.steps_per_launch or spec.train.steps))
        if start:
            self.log(f"[tcd-ds] resumed from {self.run_dir.checkpoint(start).dir}")
        progress = tqdm(total=end, initial=start, disable=self.rank != 0 or not spec.logging.progress_bar, desc="train")
        stop, write_fault = StopRequest(), None

        for step in range(start, end):
            seed_step(spec.seed, step, self.rank)
            terms = self.train_step(self.train_batches.micro_batches(step), step)
            done = step + 1
            self.guard.step(done, self.checkpointer.last_saved)
            self.logger.step(terms)
            log_now = self.logger.should_log(done, end)
            if log_now or self.validation.should_run(done):
                record = self.step_record(done)
                fault = attempt(lambda: self.logger.write(record), self.run_dir.metrics_file)
                if fault is not None:  # rank 0 alone writes: it asks every rank to stop, then all agree below
                    write_fault, stop.reason = write_fault or fault, stop.reason or "file system fault"
                progress.set_postfix(loss=f"{record['loss/mlm']:.3f}")
            progress.update(1)
            if self.checkpointer.should_save(done, end):
                self.checkpointer.save(done, self.checkpoint_state(done))
            # SIGTERM or a dead runner, on any rank: all stop after the same step, between saves. Asked at log
            # intervals only: the question is a collective that waits on the device.
            if log_now and stop.agreed(self.engine.device):
                break
        progress.close()
        agree(write_fault, self.checkpointer.last_complete())
        last = self.checkpointer.last_saved
        finished = last >= spec.train.steps
        why = stop.reason or "train.steps_per_launch"
        self.log(f"[tcd-ds] {'finished' if finished else f'stopped ({why}); last checkpoint step {last}'}; "
                 f"run dir {self.run_dir.path}")
        if self.wandb:
            self.wandb.finish()
        dist.barrier()


def train(spec: RunSpec, restart: bool = False) -> None:
    Trainer(spec, restart).fit()
