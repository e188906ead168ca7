"""Routing telemetry: what each MoE layer's router did over the log window, pooled over ranks.

The MoE layers count their training forwards on device (`DeepSpeedMoEFeedForward.routing_window`: no host sync
in a step); a logged record reads and resets them with one all-reduce. Validation (eval mode) does not count.
The expert load alone hides a collapse that the `kl_uniform` balance loss does not resist: a nearly flat router
whose top-1 choice is always the same expert has a mean routing distribution close to uniform (KL near 0,
`mean_entropy` near 1) while `max_load` is 1, `idle_experts` is E - 1 and the capacity drops most tokens.
"""

from __future__ import annotations

import math

import deepspeed.comm as dist
import torch

FIELDS = ("routed", "probs", "dropped", "entropy")  # a row of counters: [E], [E], scalar, scalar


def take_counters(model) -> tuple[list[int], torch.Tensor]:
    """This rank's counters since the last call, one row per MoE layer ([routed E | probs E | dropped | entropy]),
    and the layers' ids; the layers start a new window."""
    blocks = model.moe_blocks()
    rows = []
    for block in blocks.values():
        window = block.take_routing_window()
        rows.append(torch.cat([window[name].reshape(-1) for name in FIELDS]))
    return list(blocks), torch.stack(rows)


def routing_metrics(layers: list[int], counters: torch.Tensor) -> dict[str, float | int | list[float]]:
    """The logged keys from pooled counters (rows as `take_counters` gives them); every fraction and mean is over
    the window's real (non-padding) tokens. Entropies are divided by log E: 1 is a flat distribution."""
    experts = (counters.shape[1] - 2) // 2
    record = {}
    for layer, row in zip(layers, counters.double().cpu()):
        routed, probs, dropped, entropy = row[:experts], row[experts:2 * experts], row[-2], row[-1]
        tokens = routed.sum().clamp(min=1)
        load, mean_probs = routed / tokens, probs / tokens
        log_e = math.log(experts) if experts > 1 else float("inf")
        record.update({
            f"moe/load/layer_{layer}": load.tolist(),
            f"moe/max_load/layer_{layer}": load.max().item(),
            f"moe/idle_experts/layer_{layer}": int((routed == 0).sum()),
            f"moe/dropped/layer_{layer}": (dropped / tokens).item(),
            f"moe/entropy/layer_{layer}": (entropy / tokens).item() / log_e,
            f"moe/mean_entropy/layer_{layer}": torch.special.entr(mean_probs).sum().item() / log_e,
        })
    return record


def routing_record(model) -> dict[str, float | int | list[float]]:
    """The window's routing telemetry of every MoE layer over all ranks (a collective: every rank calls it)."""
    layers, counters = take_counters(model)
    dist.all_reduce(counters)
    return routing_metrics(layers, counters)
