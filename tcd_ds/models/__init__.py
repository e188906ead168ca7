"""Teacher (plain HF BERT) and student (BERT with DeepSpeed-MoE FFNs), built from the run spec."""

from __future__ import annotations

from transformers import BertForMaskedLM

from tcd_ds.models.bert import bert_config, build_dense
from tcd_ds.models.moe_bert import MoEBertConfig, MoEBertForMaskedLM, build_student, moe_bert_config
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.spec import ModelSpec


def build_model(model: ModelSpec, vocab_size: int, pad_token_id: int) -> BertForMaskedLM:
    """The dense teacher when `model.moe` is None, else the MoE student (a `BertForMaskedLM` subclass)."""
    if model.moe is None:
        return build_dense(model, vocab_size, pad_token_id)
    return build_student(model, vocab_size, pad_token_id)


__all__ = [
    "MoEBertConfig",
    "MoEBertForMaskedLM",
    "bert_config",
    "build_dense",
    "build_model",
    "build_student",
    "moe_bert_config",
    "moe_param_groups",
]
