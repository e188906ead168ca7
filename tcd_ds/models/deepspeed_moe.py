"""The MoE student's training class: HF BERT whose chosen FFNs are DeepSpeed-MoE layers.

The config, the layer layout and `forward` are the DeepSpeed-free model's (tcd_ds/models/modeling_moe_bert.py,
which a converted checkpoint loads into). Module paths mirror `BertForMaskedLM` exactly, so one hook path
serves teacher and student: in an MoE layer `layer.intermediate` is an identity and `layer.output.dense` is
the whole MoE FFN (H -> H), after which `BertOutput` still applies dropout, the residual add and LayerNorm.

Parameters in MoE layer i (L = num_experts / ep_size local experts, see tcd_ds.models.batched_experts):
  bert.encoder.layer.{i}.output.dense.deepspeed_moe.gate.wg.weight      [E, H]
  bert.encoder.layer.{i}.output.dense.deepspeed_moe.experts.weight      [L, I*H + H*I]  (dense_in, dense_out)
  bert.encoder.layer.{i}.output.dense.deepspeed_moe.experts.bias        [L, I + H]
In the state dict (and so in DeepSpeed's checkpoint files) the experts keep DeepSpeed's per-expert names,
`...experts.deepspeed_experts.{j}.dense_in.weight` [I, H] etc., j local (global id ep_rank * L + j).

Process groups: building the model needs no torch.distributed, and with ep_size 1 neither does running it.
With ep_size > 1 each rank holds num_experts / ep_size experts and tokens travel by all-to-all over
DeepSpeed's expert-parallel group, which `deepspeed.initialize` creates and attaches (it calls
`MoE.set_deepspeed_parallelism` on every MoE layer); so call `deepspeed.init_distributed()` before it.
Expert weights are drawn from the global torch RNG like every other weight: seed each rank differently
(e.g. seed + rank) or the experts of different expert-parallel ranks start identical; the engine then
broadcasts the shared weights from rank 0 and each expert from its expert-data-parallel source.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
from torch import Tensor

from tcd_ds.models.batched_experts import BatchedExperts
from tcd_ds.models.modeling_moe_bert import (
    ExpertFFN, MoEBertConfig, MoEBertForMaskedLM, grouped_mm_supported, kl_uniform_balance_loss,
)


def drop_capacity(tokens: int, experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's `_capacity` from the shapes, with its float32 product, as a Python int: the same number
    without reading a device tensor on the host."""
    return max(math.ceil(np.float32(tokens / experts) * np.float32(capacity_factor)), min_capacity)


class FP32TopKGate(TopKGate):
    """DeepSpeed's gate with autocast off: its `.float()` does not escape an enclosing autocast, under which the
    logits (and so the expert choices and capacity drops) would be bf16's, not the fp32 routing of training."""

    def forward(self, input: Tensor, *args, **kwargs):
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input, *args, **kwargs)


class RoutedRowsMOELayer(MOELayer):
    """DeepSpeed's MoE layer whose experts compute the kept tokens only, not the whole capacity-padded buffers
    (experts x capacity rows: 1.25x the tokens at capacity factor 1.25, empty slots included). The gate, the
    dispatch into capacity slots and the combine are DeepSpeed's own calls: which tokens are kept or dropped,
    and where each goes, do not change.

    `forward` is `MOELayer.forward` of DeepSpeed 0.19.8 (deepspeed/moe/sharded_moe.py) for top-1 routing with
    token drops, without its Tutel, tensor-parallel and wall-clock-timer branches. What differs:
    - the capacity comes from the shapes (`drop_capacity`), not from `int()` of the gate's tensor (a host read);
    - each expert's count of kept tokens on this rank travels to the expert's rank by an all-to-all beside the
      tokens', and the experts get the counts of each (source rank, local expert) block, whose tokens fill its
      first slots (the gate's locations are a running count): `BatchedExperts.forward(inputs, filled)`.
    DeepSpeed's forward runs unchanged where this one does not apply (`uses_filled_rows`)."""

    def forward(self, hidden_states: Tensor, used_token: Tensor | None = None) -> Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        if not self.uses_filled_rows(tokens):
            return super().forward(hidden_states, used_token)
        self.l_aux, _, num_experts, indices, locations, gates, self.exp_counts = self.gate(tokens, used_token, True)
        gate = self.gate
        factor = gate.capacity_factor if self.training else gate.eval_capacity_factor
        capacity = drop_capacity(tokens.shape[0], num_experts, factor, gate.min_capacity)
        slots = sharded_moe._route_slots(indices, locations, num_experts, capacity)
        dispatched = sharded_moe._sparse_encode(tokens, slots, num_experts, capacity)
        expert = torch.where(indices >= 0, indices, num_experts).long().flatten()  # E: dropped, or padding
        kept = torch.zeros(num_experts + 1, dtype=torch.long, device=tokens.device).index_add_(
            0, expert, torch.ones_like(expert))[:num_experts]
        if self.ep_size > 1:
            kept = sharded_moe._AllToAll.apply(self.ep_group, kept)  # [E] -> [source rank, local expert]
            dispatched = sharded_moe._AllToAll.apply(self.ep_group, dispatched)
        blocks = (self.ep_size, self.num_local_experts)
        out = self.experts(dispatched.view(*blocks, capacity, -1), kept.view(blocks))
        out = out.reshape(num_experts * capacity, -1)
        if self.ep_size > 1:
            out = sharded_moe._AllToAll.apply(self.ep_group, out)
        return sharded_moe._sparse_decode(out, slots, gates, tokens.shape[0]).reshape(hidden_states.shape)

    def uses_filled_rows(self, tokens: Tensor) -> bool:
        """Top-1 with token drops (else the capacity is a collective maximum, known on the host only by reading
        it), none of the branches left out, no autocast, and `torch._grouped_mm` for the tokens' dtype."""
        device = tokens.device
        return (self.gate.k == 1 and self.gate.drop_tokens and not self.use_tutel and not self.wall_clock_breakdown
                and bwc_tensor_model_parallel_world_size(groups.mpu) == 1
                and not torch.is_autocast_enabled(device.type) and grouped_mm_supported(device, tokens.dtype))


class DeepSpeedMoEFeedForward(MoE):
    """DeepSpeed's top-1 MoE as a plain [B, T, H] -> [B, T, H] module, keeping what the losses need.

    After each forward: `balance_loss` (this layer's, of the config's kind) and `expert_counts` (tokens whose
    top-1 choice is each expert, before capacity drops, this rank's tokens only). `token_mask` ([B*T], 1 for
    real tokens) is set by the model's `forward` (so call the model, not `model.bert`): padding then
    neither takes expert capacity nor counts in the load statistics, and its MoE output is zero.
    Training forwards also add to `routing_window` (device counters, read and reset by tcd_ds.train.routing).
    """

    def __init__(self, config: MoEBertConfig):
        super().__init__(
            config.hidden_size,
            expert=ExpertFFN(config),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=1,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            use_residual=False,
            noisy_gate_policy=config.noisy_gate_policy,
            drop_tokens=config.drop_tokens,
        )
        self.deepspeed_moe.experts = BatchedExperts(
            self.num_local_experts, config.hidden_size, config.intermediate_size, self.expert_group_name,
            config.initializer_range)
        self.deepspeed_moe.gate.__class__ = FP32TopKGate  # the same module and weights, routed in fp32
        self.deepspeed_moe.__class__ = RoutedRowsMOELayer  # the same module, experts on the routed tokens only
        if config.balance_loss not in ("switch", "kl_uniform"):
            raise ValueError(f"unknown balance_loss {config.balance_loss!r}: use 'switch' or 'kl_uniform'")
        self.balance_kind = config.balance_loss
        self.token_mask: Tensor | None = None
        self.balance_loss: Tensor | None = None
        self.expert_counts: Tensor | None = None
        self.routing_window: dict[str, Tensor] | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        output, l_aux, counts = super().forward(hidden_states, self.token_mask)
        self.expert_counts = counts
        probs = self._router_probs(hidden_states) if self.balance_kind == "kl_uniform" else None
        self.balance_loss = l_aux if probs is None else kl_uniform_balance_loss(probs, self.token_mask)
        if self.training:
            if probs is None:
                with torch.no_grad():
                    probs = self._router_probs(hidden_states)
            self._count_routing(probs.detach(), counts)
        return output

    def _router_probs(self, hidden_states: Tensor) -> Tensor:
        """The gate's routing probabilities [B*T, E], which DeepSpeed's gate does not return, recomputed as it
        computes them: softmax of fp32 logits, x @ wg.T, no bias. Under the `Jitter` policy DeepSpeed routes on
        jittered inputs; these probabilities are of the clean input."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, self.deepspeed_moe.gate.wg.weight.float()).softmax(dim=-1)

    def _count_routing(self, probs: Tensor, counts: Tensor) -> None:
        """Adds this forward's routing to `routing_window`, on device (no host sync): `routed` [E] (= the
        expert counts), `dropped` (tokens over their expert's capacity), `entropy` (sum over real tokens of the
        routing distribution's entropy, nats), `probs` [E] (sum over real tokens of the probabilities). The
        capacity is DeepSpeed's (`drop_capacity` over all B*T tokens, padding included, as top1gating computes it);
        top1gating keeps min(count, capacity) tokens per expert, and drops none without `drop_tokens`."""
        gate = self.deepspeed_moe.gate
        real = probs.new_ones(probs.shape[0]) if self.token_mask is None else self.token_mask.to(probs.dtype)
        if gate.drop_tokens:
            capacity = drop_capacity(*probs.shape, gate.capacity_factor, gate.min_capacity)
            dropped = (counts - capacity).clamp(min=0).sum()
        else:
            dropped = counts.new_zeros(())
        forward = {"routed": counts, "dropped": dropped, "entropy": real @ torch.special.entr(probs).sum(-1),
                   "probs": real @ probs}
        if self.routing_window is None:
            self.routing_window = {k: v.detach().double() for k, v in forward.items()}
        else:
            for k, v in forward.items():
                self.routing_window[k] += v

    def take_routing_window(self) -> dict[str, Tensor]:
        """The counters of the training forwards since the last call (zeros if none), and a fresh window."""
        window = self.routing_window
        self.routing_window = None
        if window is None:
            zeros, experts = self.deepspeed_moe.gate.wg.weight.new_zeros, self.num_experts
            shapes = {"routed": experts, "dropped": (), "entropy": (), "probs": experts}
            window = {k: zeros(shape, dtype=torch.float64) for k, shape in shapes.items()}
        return window


class DeepSpeedMoEBertForMaskedLM(MoEBertForMaskedLM):
    """The plain model's layout and forward with DeepSpeed-MoE FFNs, which bring expert parallelism, DeepSpeed's
    gate and the per-layer expert counts."""

    def moe_ffn(self, config: MoEBertConfig) -> DeepSpeedMoEFeedForward:
        return DeepSpeedMoEFeedForward(config)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> DeepSpeedMoEBertForMaskedLM:
        """A converted directory (one `model.safetensors`, as the converter writes), every expert local. HF's
        loader assigns weights by parameter name, and the packed experts take their per-expert names only through
        `load_state_dict`; so: config, model, weights."""
        from safetensors.torch import load_file

        model = cls(MoEBertConfig.from_pretrained(directory, **kwargs))
        missing, unexpected = model.load_state_dict(load_file(Path(directory) / "model.safetensors"), strict=False)
        tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # saved once, as their sources
        if unexpected or set(missing) - tied:
            raise ValueError(f"{directory} does not fit {cls.__name__}: missing {missing}, unexpected {unexpected}")
        return model
