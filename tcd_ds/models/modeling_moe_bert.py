"""MoE BERT in plain PyTorch: the student's architecture for inference and fine-tuning, without DeepSpeed.

Self-contained (torch and transformers only): the converter ships this file in every converted student
directory, where `trust_remote_code=True` loads it. With our package installed, `register_auto_classes()`
maps `moe_bert` to these classes for the Auto classes instead. The training class
(`tcd_ds.models.deepspeed_moe.DeepSpeedMoEBertForMaskedLM`) subclasses `MoEBertForMaskedLM` and swaps in
DeepSpeed-MoE FFNs.

The contract is HF's for MoE models (Mixtral, Switch): `forward` returns the load-balancing loss as
`aux_loss` and includes `config.balance_weight * aux_loss` in `loss` whenever labels are given.

Module paths are DeepSpeed-MoE's with every expert local (`output.dense.deepspeed_moe.gate.wg`,
`output.dense.deepspeed_moe.experts`). The experts' weights are stored the way they are computed, stacked over
the experts, so no forward copies them:
  ...deepspeed_moe.experts.dense_in.weight  [E, I, H]   ...deepspeed_moe.experts.dense_in.bias   [E, I]
  ...deepspeed_moe.experts.dense_out.weight [E, H, I]   ...deepspeed_moe.experts.dense_out.bias  [E, H]
Files keep DeepSpeed's per-expert names (`...experts.deepspeed_experts.{e}.dense_in.weight` [I, H] etc., e the
global expert id), so one `model.safetensors` loads into this class and into the training class, and directories
converted before the experts were stacked load unchanged. transformers maps the two layouts as it maps Mixtral's
per-expert checkpoints onto its 3D expert weights: the conversion registered for `moe_bert` below stacks the
experts in `from_pretrained` and splits them back in `save_pretrained`. `load_state_dict` also accepts the
per-expert names (`Experts._load_from_state_dict`: DeepSpeed's files, the converter); `state_dict()` has the
stacked ones.

Routing is DeepSpeed's top-1 gate (`deepspeed.moe.sharded_moe.top1gating`) written out:
- logits = x @ wg.T in fp32; probs = softmax(logits); each real token goes to its argmax expert and its
  output is probs[expert] * expert(x). Padding (attention_mask 0) goes to no expert and gets output 0.
- Capacity per expert = max(ceil(S / E * factor), min_capacity), computed in fp32 as DeepSpeed does, where
  S counts every position of the call (padding included) and factor is `capacity_factor` in training and
  `eval_capacity_factor` in eval. `drop_tokens=False` means unlimited capacity.
- In training an expert keeps at most `capacity` of its tokens; the others get MoE output 0 (the residual
  carries them). DeepSpeed picks the kept tokens at random (Random Token Selection), and so does this class.
- Eval and inference drop no token by default (`eval_drop_tokens=False`): every real token goes through its
  expert, so an example's output does not depend on the other examples of its batch or on their order.
  DeepSpeed's own eval (the engine in eval mode, as in training-time validation) does drop, at
  `eval_capacity_factor` and at random; the two agree wherever no expert overflows (e.g. with
  `eval_capacity_factor` >= num_experts). `eval_drop_tokens=True` restores capacity at eval, keeping each
  expert's first `capacity` tokens in batch order (row-major over [batch, position]), deterministic; to
  reproduce a training-time evaluation that dropped tokens, call it with one rank's micro-batch (DeepSpeed
  computes capacity per rank's micro-batch).
- Routing runs in fp32 with autocast off, so bf16 fine-tuning routes as fp32 pre-training did.
- The experts run batched over their stacked weights (views, no copy), the kept tokens sorted by expert: one
  `torch._grouped_mm` per projection where it runs (CPU; CUDA bf16 from sm90; under autocast in its dtype),
  each expert's rows padded to a 16-byte multiple as the CUDA kernels need, with every shape fixed by the token
  count, so the forward reads nothing back to the host. Elsewhere (host reads there) one `baddbmm` over a
  capacity-padded [experts, rows, H] buffer, or, where routing is so uneven that padding would more than
  double the work, one product per expert.
- Noise (`noisy_gate_policy`) applies in training only, as in DeepSpeed: `Jitter` scales the gate input by
  U(0.99, 1.01), `RSample` adds Gumbel noise to the logits that pick the expert.
- Unlike DeepSpeed, a call with fewer tokens than `min_capacity` is allowed (everything fits).
- The load-balancing loss (`config.balance_loss`): `switch` is DeepSpeed's `l_aux`, `kl_uniform` the KL of the
  mean routing probabilities to uniform; `aux_loss` is its mean over MoE layers, unweighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig, BertForMaskedLM,
    BertForSequenceClassification,
)
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput

JITTER = 1e-2  # DeepSpeed's multiplicative_jitter epsilon


@strict
class MoEBertConfig(BertConfig):
    """BertConfig plus the MoE layout and routing; `ep_size` only shapes a training-time model (a converted
    HF directory has ep_size 1: every expert local)."""

    model_type = "moe_bert"
    moe_layers: list[int] | None = None
    num_experts: int = 4
    ep_size: int = 1
    capacity_factor: float | int = 1.0
    eval_capacity_factor: float | int = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    eval_drop_tokens: bool = False
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = None
    balance_loss: Literal["switch", "kl_uniform"] = "switch"
    balance_weight: float | int = 0.01

    def __post_init__(self, **kwargs):
        self.moe_layers = [] if self.moe_layers is None else list(self.moe_layers)
        super().__post_init__(**kwargs)


class ExpertFFN(nn.Module):
    """One expert: BERT's FFN without its residual (dense_in = intermediate.dense, dense_out = output.dense). The
    per-expert layout of the files and of DeepSpeed's `Experts`, which the training class builds from it."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.dense_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_out(F.gelu(self.dense_in(x)))


class Top1Gate(nn.Module):
    """Which expert each token goes to, with what weight, and whether it fits in that expert's capacity."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.wg = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.min_capacity = config.min_capacity
        self.drop_tokens = config.drop_tokens
        self.eval_drop_tokens = config.eval_drop_tokens
        self.noisy_gate_policy = config.noisy_gate_policy

    def capacity(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        # DeepSpeed multiplies by a float32 tensor, so the product (and its ceiling) is float32's; numpy's float32
        # gives the same on the host, with no tensor to read back.
        scaled = np.float32(num_tokens / self.wg.out_features) * np.float32(factor)
        return max(math.ceil(scaled), self.min_capacity)

    def forward(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x [S, H] -> expert [S] (long), probs [S, E] (fp32), kept [S] (bool). Autocast is off: under it `.float()`
        would not keep the logits fp32, and bf16 logits pick other experts than pre-training's fp32 routing."""
        with torch.autocast(x.device.type, enabled=False):
            return self.route(x.float(), token_mask)

    def route(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and self.noisy_gate_policy == "Jitter":
            x = x * torch.empty_like(x).uniform_(1.0 - JITTER, 1.0 + JITTER)
        logits = F.linear(x, self.wg.weight.float())
        probs = logits.softmax(dim=-1)
        if self.training and self.noisy_gate_policy == "RSample":
            expert = (logits - torch.log(-torch.log(torch.rand_like(logits)))).argmax(dim=-1)
        else:
            expert = probs.argmax(dim=-1)
        kept = torch.ones_like(expert, dtype=torch.bool) if token_mask is None else token_mask.bool()
        if self.drop_tokens and (self.training or self.eval_drop_tokens):
            kept = kept & self.within_capacity(expert, kept)
        return expert, probs, kept

    def within_capacity(self, expert: Tensor, routed: Tensor) -> Tensor:
        """Whether each token is among the first `capacity` routed tokens of its expert, in batch order (eval)
        or in a random order (training: DeepSpeed's Random Token Selection)."""
        num_tokens = expert.shape[0]
        if self.training:
            order = torch.randperm(num_tokens, device=expert.device)
        else:
            order = torch.arange(num_tokens, device=expert.device)
        one_hot = F.one_hot(expert[order], self.wg.out_features) * routed[order, None]
        rank_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # -1 for tokens not routed
        fits = torch.empty_like(routed)
        fits[order] = rank_in_expert < self.capacity(num_tokens)
        return fits


def expert_ffn(x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """`ExpertFFN.forward` with one expert's weights: x [N, H] -> [N, H]."""
    return F.linear(F.gelu(F.linear(x, w_in, b_in)), w_out, b_out)


def batched_expert_ffn(x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """`ExpertFFN.forward` of each expert on its own rows, one product per projection: x [E, N, H] -> [E, N, H]."""
    h = F.gelu(torch.baddbmm(b_in.unsqueeze(1), x, w_in.transpose(1, 2)))
    return torch.baddbmm(b_out.unsqueeze(1), h, w_out.transpose(1, 2))


class StackedLinear(nn.Module):
    """One `nn.Linear` per expert, stacked as the batched products take them: weight [experts, out, in], bias
    [experts, out]. Initialised as `nn.Linear` is, each expert its own draw; in a model, as BERT's Linears
    (`MoEBertLayers.initialize_weights`)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features).uniform_(-bound, bound))


EXPERT_TENSORS = ("dense_in.weight", "dense_in.bias", "dense_out.weight", "dense_out.bias")


class Experts(nn.Module):
    """All experts of one layer, indexed by global expert id, their weights stacked (module docstring)."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.dense_in = StackedLinear(config.num_experts, config.hidden_size, config.intermediate_size)
        self.dense_out = StackedLinear(config.num_experts, config.intermediate_size, config.hidden_size)

    def stacked(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The parameters themselves: dense_in [E, I, H] and [E, I], dense_out [E, H, I] and [E, H]."""
        return self.dense_in.weight, self.dense_in.bias, self.dense_out.weight, self.dense_out.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also takes the experts under their per-expert names (`deepspeed_experts.{e}.dense_in.weight`, ...: the
        files, DeepSpeed's state dicts), stacked here into the parameters' names when every expert is there."""
        for name in EXPERT_TENSORS:
            keys = [f"{prefix}deepspeed_experts.{e}.{name}" for e in range(self.num_experts)]
            if all(key in state_dict for key in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, rows: Tensor, group: Tensor, counts: Tensor) -> Tensor:
        """rows [S, H] sorted by `group` [S] (the expert, or E for a token no expert runs), `counts[e]` of them
        expert e's -> each row through its expert, [S, H], zero for group E.

        With `torch._grouped_mm` no shape depends on the routing, so nothing is read back to the host; without
        it (e.g. CUDA before sm90, or fp32 on CUDA) the rows go through a capacity-padded product, or one
        product per expert where padding would more than double the work, both sized on the host."""
        num_experts = self.num_experts
        routed = (group < num_experts).unsqueeze(1)
        compute_dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) \
            else rows.dtype
        if grouped_mm_supported(rows.device, compute_dtype):
            rows = torch.where(routed, rows, 0).to(compute_dtype)  # where: no gradient into rows no expert runs
            weights = (w.to(compute_dtype) for w in self.stacked())  # no copy but autocast's cast
            out = grouped_expert_ffn(rows, group, counts, *weights)
            return torch.where(routed, out, 0)
        kept = int(counts.sum())  # the host reads of this path
        sizes, rows = counts.tolist(), rows[:kept]
        capacity = max(sizes)
        if num_experts * capacity > 2 * kept:  # padding would more than double the work
            # unbind: views, whose backward is one stack (indexing would zero-fill a whole gradient per expert)
            experts = zip(rows.split(sizes), *(w.unbind() for w in self.stacked()))
            out = torch.cat([expert_ffn(chunk, *weights) for chunk, *weights in experts])
        else:
            owner = group[:kept]
            slot = torch.arange(kept, device=rows.device) - (counts.cumsum(0) - counts)[owner]
            padded = rows.new_zeros(num_experts, capacity, rows.shape[1]).index_put((owner, slot), rows)
            out = batched_expert_ffn(padded, *self.stacked())[owner, slot]
        return torch.cat([out, out.new_zeros(len(group) - kept, out.shape[1])])


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` (one product over row groups of different sizes) runs: on CPU in fp32, bf16 or
    fp16, and on CUDA for bf16 from compute capability 9.0."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def group_alignment(dtype: torch.dtype) -> int:
    """Rows per group a multiple of this: 16 bytes of a row-major column, which the CUDA grouped kernels need for
    the weight gradient (its jagged dimension is the rows); torchtitan pads bf16 groups to 8 rows likewise."""
    return max(1, 16 // dtype.itemsize)


def aligned_rows(group: Tensor, counts: Tensor, align: int) -> tuple[Tensor, Tensor, int]:
    """Where each sorted row goes when every expert's group starts at a multiple of `align`: destination [S],
    group ends [E] (int32, `_grouped_mm`'s `offs`) and the buffer's row count, S + E * (align - 1), fixed by
    the shapes alone. Rows of group E (no expert) go after the last group."""
    num_experts, num_rows = len(counts), len(group)
    padded = (counts + align - 1) // align * align
    ends = padded.cumsum(0)
    starts = torch.cat([ends - padded, ends[-1:]])  # group E starts after the last expert's
    first_row = torch.cat([counts.cumsum(0) - counts, counts.sum().reshape(1)])
    destination = starts[group] + torch.arange(num_rows, device=group.device) - first_row[group]
    return destination, ends.to(torch.int32), num_rows + num_experts * (align - 1)


def grouped_expert_ffn(rows: Tensor, group: Tensor, counts: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
                       b_out: Tensor) -> Tensor:
    """`ExpertFFN.forward` over rows sorted by expert, groups padded to the kernels' alignment only:
    rows [S, H] -> [S, H]; rows of group E and padding rows are not computed (their output is undefined)."""
    destination, ends, buffer_rows = aligned_rows(group, counts, group_alignment(rows.dtype))
    buffer = rows.new_zeros(buffer_rows, rows.shape[1]).index_copy(0, destination, rows)
    position = torch.arange(buffer_rows, device=rows.device, dtype=torch.int32)
    owner = torch.searchsorted(ends, position, right=True).clamp(max=len(counts) - 1)
    in_group = (position < ends[-1]).unsqueeze(1)  # where: rows past the groups, whose gradients the kernels
    h = F.gelu(torch._grouped_mm(buffer, w_in.transpose(1, 2), offs=ends) + torch.where(in_group, b_in[owner], 0))
    out = torch._grouped_mm(h, w_out.transpose(1, 2), offs=ends)  # leave undefined, pass none to the biases
    return (out + torch.where(in_group, b_out[owner], 0))[destination]


class Top1MoE(nn.Module):
    """Gate, then each kept token through its expert, scaled by its gate probability: x [S, H] -> output [S, H],
    with the routing probabilities [S, E] and each token's expert [S] for the balance loss. Every shape is
    fixed by S: the tokens are sorted by expert with the dropped ones last, none selected by a host read."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.gate = Top1Gate(config)
        self.experts = Experts(config)

    def forward(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        expert, probs, kept = self.gate(x, token_mask)
        num_experts = probs.shape[1]
        weight = probs.gather(1, expert[:, None]).squeeze(1)
        group = torch.where(kept, expert, num_experts)  # E: a group no expert runs
        order = group.argsort(stable=True)  # kept tokens grouped by expert, in batch order; dropped ones last
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=x.device).index_add_(
            0, group, torch.ones_like(group))[:num_experts]
        out = self.experts(x[order], group[order], counts)
        routed = weight[order, None] * out.float()  # combined in fp32, as DeepSpeed
        return torch.zeros_like(x).index_copy(0, order, routed.to(x.dtype)), probs, expert


def switch_balance_loss(probs: Tensor, expert: Tensor, token_mask: Tensor | None) -> Tensor:
    """DeepSpeed's top-1 `l_aux` (Switch Transformer): E * sum_e mean_s(probs[s, e]) * mean_s(expert[s] == e), the
    means over every position of the call, padding counted in the first and routed nowhere in the second."""
    chosen = F.one_hot(expert, probs.shape[-1]).float()
    if token_mask is not None:
        chosen = chosen * token_mask.float().unsqueeze(1)
    return (probs.mean(dim=0) * chosen.mean(dim=0)).sum() * probs.shape[-1]


def kl_uniform_balance_loss(probs: Tensor, token_mask: Tensor | None) -> Tensor:
    """KL(mean routing probabilities over real tokens || uniform) = sum_e p_e log(E p_e)."""
    if token_mask is None:
        mean = probs.mean(dim=0)
    else:
        weights = token_mask.to(probs.dtype).unsqueeze(1)
        mean = (probs * weights).sum(dim=0) / weights.sum().clamp(min=1.0)
    return torch.xlogy(mean, mean * probs.shape[-1]).sum()


class MoEFeedForward(nn.Module):
    """The MoE FFN as BERT's `output.dense` ([B, T, H] -> [B, T, H]), keeping its last call's `balance_loss`.
    `token_mask` ([B*T], 1 for real tokens) is set by the model's `forward`."""

    def __init__(self, config: MoEBertConfig):
        super().__init__()
        self.deepspeed_moe = Top1MoE(config)
        self.balance_kind = config.balance_loss
        self.token_mask: Tensor | None = None
        self.balance_loss: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out, probs, expert = self.deepspeed_moe(flat, self.token_mask)
        if self.balance_kind == "switch":
            self.balance_loss = switch_balance_loss(probs, expert, self.token_mask)
        else:
            self.balance_loss = kl_uniform_balance_loss(probs, self.token_mask)
        return out.reshape(hidden_states.shape)


@dataclass
class MoEMaskedLMOutput(MaskedLMOutput):
    """`MaskedLMOutput` plus the unweighted load-balancing loss; `loss` already includes it with its weight."""

    aux_loss: Tensor | None = None


@dataclass
class MoESequenceClassifierOutput(SequenceClassifierOutput):
    """`SequenceClassifierOutput` plus the unweighted load-balancing loss; `loss` already includes it."""

    aux_loss: Tensor | None = None


class SparseMaskedLM:
    """Mixin for `BertForMaskedLM`: `forward` also takes `masked_positions` (flat indices into B*T) and then runs
    the MLM head at those tokens only, returning `[M, V]` logits and the loss over them. The head (a
    vocabulary-wide product, then a softmax in the loss) costs as much as the whole encoder at small hidden
    sizes, and training needs it at the ~15% masked tokens only; the positions come from the host copy of the
    labels, so nothing waits on the device. Without `masked_positions` it is HF's forward."""

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        masked_positions: Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        outputs = self.bert(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )
        hidden = outputs[0]
        if masked_positions is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_positions)
            labels = None if labels is None else labels.reshape(-1).index_select(0, masked_positions)
        logits = self.cls(hidden)
        loss = None
        if labels is not None:  # HF's MLM loss: label -100 is ignored; fp32, as bf16 rounds a loss of 6.6 to 0.03
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class MoEBertLayers:
    """Mixin for a BERT model class: `config.moe_layers` become MoE layers, laid out as DeepSpeed's student (in an
    MoE layer `layer.intermediate` is an identity and `layer.output.dense` the whole MoE FFN, H -> H, after which
    `BertOutput` still applies dropout, the residual add and LayerNorm)."""

    config_class = MoEBertConfig
    config: MoEBertConfig
    output_class: type  # the BERT class's output type plus `aux_loss`

    def __init__(self, config: MoEBertConfig):
        super().__init__(config)
        for i in config.moe_layers:
            layer = self.bert.encoder.layer[i]
            layer.intermediate = nn.Identity()
            layer.output.dense = self.moe_ffn(config)
        self.post_init()  # HF-initialises the new gate and expert weights, each expert by its own draw

    def moe_ffn(self, config: MoEBertConfig) -> nn.Module:
        """The module that becomes `output.dense` in an MoE layer (the training class returns DeepSpeed's)."""
        return MoEFeedForward(config)

    def initialize_weights(self) -> None:
        """HF's initialisation, then the stacked experts' as BERT's Linears': normal(0, initializer_range) weights,
        zero biases. Not in `_init_weights`: HF initialises the encoder's modules with `BertModel`'s, which knows
        nothing of them. Weights loaded from a file keep their values (`transformers.initialization` skips them)."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, StackedLinear):
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
                init.zeros_(module.bias)

    def moe_blocks(self) -> dict[int, nn.Module]:
        return {i: self.bert.encoder.layer[i].output.dense for i in self.config.moe_layers}

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ):
        """The BERT class's forward, with this call's balance loss as `aux_loss` (the mean over MoE layers), added
        to `loss` with `config.balance_weight` (Mixtral's `router_aux_loss_coef`). Padding (attention_mask 0) takes
        no expert capacity and gets MoE output 0. The arguments are spelt out: `transformers.Trainer` passes a
        model only the batch keys its signature names."""
        token_mask = None if attention_mask is None else attention_mask.reshape(-1).long()
        for block in self.moe_blocks().values():
            block.token_mask = token_mask
        output = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs,
        )
        aux_loss = torch.stack([block.balance_loss for block in self.moe_blocks().values()]).mean()
        fields = dict(output)
        if fields.get("loss") is not None:
            fields["loss"] = fields["loss"] + self.config.balance_weight * aux_loss
        return self.output_class(**fields, aux_loss=aux_loss)


class MoEBertForMaskedLM(MoEBertLayers, SparseMaskedLM, BertForMaskedLM):
    """`BertForMaskedLM` with MoE layers (and `masked_positions`); `loss` = MLM loss + `balance_weight * aux_loss`."""

    output_class = MoEMaskedLMOutput


class MoEBertForSequenceClassification(MoEBertLayers, BertForSequenceClassification):
    """`BertForSequenceClassification` with MoE layers: a converted student's encoder weights load as they are
    (its MLM head is dropped; pooler and classifier are new). `loss` = task loss + `balance_weight * aux_loss`:
    set `config.balance_weight` (0: off) to fine-tune with another weight than pre-training's."""

    output_class = MoESequenceClassifierOutput


# How transformers maps the files' per-expert names onto the stacked parameters of the `moe_bert` classes (also
# when this file runs as remote code): `from_pretrained` stacks expert e's tensor at index e and `save_pretrained`
# splits them back, as it loads Mixtral's per-expert checkpoints into 3D expert weights. Registered on import:
# transformers takes a conversion from its registry only (by class name or model type), none from a model class.
register_checkpoint_conversion_mapping(MoEBertConfig.model_type, [
    WeightConverter(f"experts.deepspeed_experts.*.{name}", f"experts.{name}", operations=[MergeModulelist(dim=0)])
    for name in EXPERT_TENSORS
], overwrite=True)


def register_auto_classes() -> None:
    """Map `model_type: moe_bert` to these classes for `AutoConfig`, `AutoModelForMaskedLM` and
    `AutoModelForSequenceClassification`, so a converted student loads without `trust_remote_code`."""
    AutoConfig.register(MoEBertConfig.model_type, MoEBertConfig, exist_ok=True)
    AutoModelForMaskedLM.register(MoEBertConfig, MoEBertForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(MoEBertConfig, MoEBertForSequenceClassification, exist_ok=True)
