"""AdamW and its warmup-then-decay schedule, built here rather than by DeepSpeed so that the same torch
optimizer (fused on CUDA and CPU) runs on every accelerator without a JIT-compiled op. Fused on CPU too: one
pass over each flat ZeRO partition instead of a dozen, which is most of the step of a many-expert student (64
experts: 10x faster, tools/bench.py --experts)."""

from __future__ import annotations

import math

import torch

from tcd_ds.spec import OptimSpec


def build_optimizer(param_groups: list[dict], optim: OptimSpec, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups,
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=device_type in ("cuda", "cpu"),
    )


def lr_multiplier(step: int, total_steps: int, optim: OptimSpec) -> float:
    """Linear warmup to the peak, then `optim.decay` down to `min_lr_ratio` of it at `total_steps`."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 1.0 - progress if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSpec, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, optim))
