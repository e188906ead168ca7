"""Sequence classification on a converted MoE student, with the load-balancing loss kept for fine-tuning.

Importing this module registers `MoEBertForSequenceClassification` for `model_type: moe_bert`, so
`AutoModelForSequenceClassification.from_pretrained(converted_student_dir, num_labels=...)` builds it (a teacher
directory gives HF's plain `BertForSequenceClassification`). Its encoder is the DeepSpeed-free student of
`tcd_ds.hf.modeling_moe_bert`; the MLM head of the checkpoint is dropped, pooler and classifier are new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from tcd_ds.hf import modeling_moe_bert as plain
from tcd_ds.hf.modeling_moe_bert import MoEBertConfig


def switch_balance_loss(probs: Tensor, token_mask: Tensor | None) -> Tensor:
    """DeepSpeed's top-1 `l_aux` (Switch Transformer): E * sum_e mean_s(probs[s, e]) * mean_s(top1[s] == e), the
    means over every position of the call, with padding counted in the first and routed nowhere in the second."""
    chosen = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).float()
    if token_mask is not None:
        chosen = chosen * token_mask.unsqueeze(1)
    return (probs.mean(dim=0) * chosen.mean(dim=0)).sum() * probs.shape[-1]


def kl_uniform_balance_loss(probs: Tensor, token_mask: Tensor | None) -> Tensor:
    """KL(mean routing probabilities over real tokens || uniform) = sum_e p_e log(E p_e), as in pre-training."""
    if token_mask is None:
        mean = probs.mean(dim=0)
    else:
        weights = token_mask.to(probs.dtype).unsqueeze(1)
        mean = (probs * weights).sum(dim=0) / weights.sum().clamp(min=1.0)
    return torch.xlogy(mean, mean * probs.shape[-1]).sum()


class BalancedMoEFeedForward(plain.MoEFeedForward):
    """The plain MoE FFN, also keeping its last forward's load-balancing loss (of the config's kind). The routing
    probabilities are recomputed from the gate's input (cheap: H x E); under gate noise they are the clean ones."""

    def __init__(self, config: MoEBertConfig):
        super().__init__(config)
        self.balance_kind = config.balance_loss
        self.balance_loss: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        output = super().forward(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        probs = F.linear(flat, self.deepspeed_moe.gate.wg.weight.float()).softmax(dim=-1)
        mask = None if self.token_mask is None else self.token_mask.float()
        loss = switch_balance_loss if self.balance_kind == "switch" else kl_uniform_balance_loss
        self.balance_loss = loss(probs, mask)
        return output


class MoEBertForSequenceClassification(BertForSequenceClassification):
    """`BertForSequenceClassification` with `config.moe_layers` made MoE layers, laid out as the converted
    student (`layer.intermediate` an identity, `layer.output.dense` the MoE FFN), so its weights load as they are.
    `loss` is the task loss only; add `config.balance_weight * balance_loss()` to train as in pre-training."""

    config_class = MoEBertConfig
    config: MoEBertConfig

    def __init__(self, config: MoEBertConfig):
        super().__init__(config)
        for i in config.moe_layers:
            layer = self.bert.encoder.layer[i]
            layer.intermediate = nn.Identity()
            layer.output.dense = BalancedMoEFeedForward(config)
        self.post_init()

    def moe_blocks(self) -> dict[int, BalancedMoEFeedForward]:
        return {i: self.bert.encoder.layer[i].output.dense for i in self.config.moe_layers}

    def balance_loss(self) -> Tensor:
        """Mean over MoE layers of the last forward's load-balancing loss (unweighted)."""
        return torch.stack([block.balance_loss for block in self.moe_blocks().values()]).mean()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        token_mask = None if attention_mask is None else attention_mask.reshape(-1).long()
        for block in self.moe_blocks().values():
            block.token_mask = token_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


AutoConfig.register(MoEBertConfig.model_type, MoEBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MoEBertConfig, MoEBertForSequenceClassification, exist_ok=True)
