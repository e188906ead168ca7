"""The dense teacher's training class: HF's `BertForMaskedLM` whose forward also takes `masked_positions`.

Parameter names, weight tying and checkpoints are those of a plain `BertForMaskedLM`, so a converted teacher is
an ordinary BERT checkpoint.
"""

from __future__ import annotations

from transformers import BertForMaskedLM

from tcd_ds.models.modeling_moe_bert import SparseMaskedLM


class BertForSparseMaskedLM(SparseMaskedLM, BertForMaskedLM):
    """`BertForMaskedLM` with the MLM head run at `masked_positions` only when they are given."""
