"""Run spec -> the model a run trains: the dense teacher, or the MoE student with DeepSpeed-MoE FFNs."""

from __future__ import annotations

from transformers import PreTrainedModel

from tcd_ds.models.bert import BertForSparseMaskedLM
from tcd_ds.models.configs import bert_config, moe_bert_config
from tcd_ds.models.deepspeed_moe import DeepSpeedMoEBertForMaskedLM
from tcd_ds.spec import ModelSpec


def build_model(model: ModelSpec, vocab_size: int, pad_token_id: int) -> PreTrainedModel:
    """The dense teacher when `model.moe` is None, else the MoE student."""
    if model.moe is None:
        return BertForSparseMaskedLM(bert_config(model, vocab_size, pad_token_id))
    return DeepSpeedMoEBertForMaskedLM(moe_bert_config(model, vocab_size, pad_token_id))
