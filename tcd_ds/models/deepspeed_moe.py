"""The MoE student's training class: HF BERT whose chosen FFNs are DeepSpeed-MoE layers.

The config, the layer layout and `forward` are the DeepSpeed-free model's (tcd_ds/models/modeling_moe_bert.py,
which a converted checkpoint loads into). Module paths mirror `BertForMaskedLM` exactly, so one hook path
serves teacher and student: in an MoE layer `layer.intermediate` is an identity and `layer.output.dense` is
the whole MoE FFN (H -> H), after which `BertOutput` still applies dropout, the residual add and LayerNorm.

Parameter names in MoE layer i (j a local expert; its global id is ep_rank * num_experts / ep_size + j):
  bert.encoder.layer.{i}.output.dense.deepspeed_moe.gate.wg.weight                              [E, H]
  bert.encoder.layer.{i}.output.dense.deepspeed_moe.experts.deepspeed_experts.{j}.dense_in.*    [I, H], [I]
  bert.encoder.layer.{i}.output.dense.deepspeed_moe.experts.deepspeed_experts.{j}.dense_out.*   [H, I], [H]

Process groups: building the model needs no torch.distributed, and with ep_size 1 neither does running it.
With ep_size > 1 each rank holds num_experts / ep_size experts and tokens travel by all-to-all over
DeepSpeed's expert-parallel group, which `deepspeed.initialize` creates and attaches (it calls
`MoE.set_deepspeed_parallelism` on every MoE layer); so call `deepspeed.init_distributed()` before it.
Expert weights are drawn from the global torch RNG like every other weight: seed each rank differently
(e.g. seed + rank) or the experts of different expert-parallel ranks start identical; the engine then
broadcasts the shared weights from rank 0 and each expert from its expert-data-parallel source.
"""

from __future__ import annotations

import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import Tensor

from tcd_ds.models.batched_experts import BatchedExperts
from tcd_ds.models.modeling_moe_bert import ExpertFFN, MoEBertConfig, MoEBertForMaskedLM, kl_uniform_balance_loss


class DeepSpeedMoEFeedForward(MoE):
    """DeepSpeed's top-1 MoE as a plain [B, T, H] -> [B, T, H] module, keeping what the losses need.

    After each forward: `balance_loss` (this layer's, of the config's kind) and `expert_counts` (tokens whose
    top-1 choice is each expert, before capacity drops, this rank's tokens only). `token_mask` ([B*T], 1 for
    real tokens) is set by the model's `forward` (so call the model, not `model.bert`): padding then
    neither takes expert capacity nor counts in the load statistics, and its MoE output is zero.
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
        self.deepspeed_moe.experts = BatchedExperts(self.deepspeed_moe.experts)
        if config.balance_loss not in ("switch", "kl_uniform"):
            raise ValueError(f"unknown balance_loss {config.balance_loss!r}: use 'switch' or 'kl_uniform'")
        self.balance_kind = config.balance_loss
        self.token_mask: Tensor | None = None
        self.balance_loss: Tensor | None = None
        self.expert_counts: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        output, l_aux, counts = super().forward(hidden_states, self.token_mask)
        self.expert_counts = counts
        self.balance_loss = l_aux if self.balance_kind == "switch" else self._kl_to_uniform(hidden_states)
        return output

    def _kl_to_uniform(self, hidden_states: Tensor) -> Tensor:
        """KL(mean routing probs || uniform) = sum_e p_e log(E p_e), over real tokens.

        DeepSpeed's gate does not return its probabilities, so they are recomputed as it computes them: softmax
        of fp32 logits, x @ wg.T, no bias. Under the `Jitter` policy DeepSpeed routes on jittered inputs; these
        probabilities are of the clean input.
        """
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        probs = F.linear(x, self.deepspeed_moe.gate.wg.weight.float()).softmax(dim=-1)
        return kl_uniform_balance_loss(probs, self.token_mask)


class DeepSpeedMoEBertForMaskedLM(MoEBertForMaskedLM):
    """The plain model's layout and forward with DeepSpeed-MoE FFNs, which bring expert parallelism, DeepSpeed's
    gate and the per-layer expert counts."""

    def moe_ffn(self, config: MoEBertConfig) -> DeepSpeedMoEFeedForward:
        return DeepSpeedMoEFeedForward(config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> DeepSpeedMoEBertForMaskedLM:
        """HF loading replaces parameter objects, dropping the tags by which DeepSpeed tells expert parameters
        from shared ones (ZeRO groups, gradient reduction); put them back."""
        model = super().from_pretrained(*args, **kwargs)
        for block in model.moe_blocks().values():
            for p in block.deepspeed_moe.experts.parameters():
                p.allreduce = False
                p.group_name = block.expert_group_name
        return model
