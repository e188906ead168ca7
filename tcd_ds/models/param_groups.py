"""Optimizer parameter groups in the shape DeepSpeed-MoE's ZeRO wants them."""

from __future__ import annotations

from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn


def moe_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices, not biases or LayerNorm gains (the packed expert biases are matrices, hence the
    name); then expert parameters move to their own groups, because ZeRO reduces expert gradients over the
    expert-data-parallel group, not the whole world. A model without experts gets the two groups unchanged.
    Every group has the `name` DeepSpeed requires."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p.ndim >= 2 and not n.endswith("bias") for n, p in named]
    groups = [
        {"name": "decay", "params": [p for (_, p), d in zip(named, decay) if d], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for (_, p), d in zip(named, decay) if not d], "weight_decay": 0.0},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)
