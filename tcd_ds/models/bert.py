"""The dense teacher: a plain HF `BertForMaskedLM`, so a converted teacher is an ordinary BERT checkpoint."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
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


class MaskedMLMHead(nn.Module):
    """BERT's MLM head (`cls`) that, while `positions` is set (flat indices into B*T), runs at those tokens only
    and returns `[M, V]` logits. The head (a vocabulary-wide matrix product, then a softmax in the loss) costs as
    much as the whole encoder at small hidden sizes, and in training only the ~15% masked tokens need it; the
    training engine sets `positions` around its forward and computes the MLM loss on the rows it gets.

    It holds HF's `predictions` module itself, so parameter names, weight tying and checkpoints are those of a
    plain `BertForMaskedLM`, and with `positions` unset it is HF's head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.predictions = head.predictions
        self.positions: Tensor | None = None

    def forward(self, sequence_output: Tensor) -> Tensor:
        if self.positions is not None:
            flat = sequence_output.reshape(-1, sequence_output.shape[-1])
            sequence_output = flat.index_select(0, self.positions)
        return self.predictions(sequence_output)


def with_masked_mlm_head(model: BertForMaskedLM) -> BertForMaskedLM:
    """The training models' head (the engine relies on it); converted checkpoints get HF's own."""
    model.cls = MaskedMLMHead(model.cls)
    return model


def build_dense(model: ModelSpec, vocab_size: int, pad_token_id: int) -> BertForMaskedLM:
    return with_masked_mlm_head(BertForMaskedLM(bert_config(model, vocab_size, pad_token_id)))
