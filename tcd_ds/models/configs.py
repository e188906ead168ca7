"""Run spec -> Hugging Face configs, for the dense teacher (`BertConfig`) and the MoE student (`MoEBertConfig`).

The trainer, the converter and the teacher loader all build the config a run trained with from here, so a
converted directory and a resumed run always agree with the run itself.
"""

from __future__ import annotations

from typing import Any

from transformers import BertConfig

from tcd_ds.models.modeling_moe_bert import MoEBertConfig
from tcd_ds.spec import ModelSpec


def bert_kwargs(model: ModelSpec, vocab_size: int, pad_token_id: int) -> dict[str, Any]:
    """The BertConfig fields shared by teacher and student (the student adds its MoE fields)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        intermediate_size=model.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.attention_dropout,
        max_position_embeddings=model.max_position,
        type_vocab_size=2,  # pre-training uses segment 0 only; 2 keeps GLUE sentence pairs fine-tunable
        pad_token_id=pad_token_id,
        # torch SDPA runs on every accelerator (CPU included) and is the fast path; it returns the per-head
        # context the attention relation needs, only not the attention probabilities.
        attn_implementation="sdpa",
    )


def bert_config(model: ModelSpec, vocab_size: int, pad_token_id: int) -> BertConfig:
    return BertConfig(**bert_kwargs(model, vocab_size, pad_token_id))


def moe_bert_config(model: ModelSpec, vocab_size: int, pad_token_id: int) -> MoEBertConfig:
    moe = model.moe
    return MoEBertConfig(
        **bert_kwargs(model, vocab_size, pad_token_id),
        moe_layers=moe.layer_ids(model.num_layers),
        num_experts=moe.num_experts,
        ep_size=moe.ep_size,
        capacity_factor=moe.capacity_factor,
        eval_capacity_factor=moe.eval_capacity_factor,
        min_capacity=moe.min_capacity,
        drop_tokens=moe.drop_tokens,
        noisy_gate_policy=moe.noisy_gate_policy,
        balance_loss=moe.balance_loss,
        balance_weight=moe.balance_weight,
    )


def model_config(model: ModelSpec, vocab_size: int, pad_token_id: int) -> BertConfig:
    """The teacher's config when `model.moe` is None, else the student's."""
    if model.moe is None:
        return bert_config(model, vocab_size, pad_token_id)
    return moe_bert_config(model, vocab_size, pad_token_id)
