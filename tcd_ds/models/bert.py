"""The dense teacher: a plain HF `BertForMaskedLM`, so a converted teacher is an ordinary BERT checkpoint."""

from __future__ import annotations

from typing import Any

from transformers import BertConfig, BertForMaskedLM

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


def build_dense(model: ModelSpec, vocab_size: int, pad_token_id: int) -> BertForMaskedLM:
    return BertForMaskedLM(bert_config(model, vocab_size, pad_token_id))
