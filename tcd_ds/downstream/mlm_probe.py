"""MLM loss and accuracy of a converted model on out-of-domain text: the paper's probe of feature quality.

The text is cut into blocks and masked exactly as the pre-training validation set is (tcd_ds.data), with a fixed
seed, so models that share a tokenizer (a teacher and its students) are scored on the very same masked tokens,
and the numbers compare with the runs' in-domain `val/loss/mlm`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from tcd_ds.data.blocks import build_block_dataset
from tcd_ds.data.loader import validation_batches
from tcd_ds.models import register_auto_classes
from tcd_ds.models.bert import BertForSparseMaskedLM
from tcd_ds.models.scoring import mlm_sums


@torch.no_grad()
def mlm_probe(
    model_dir: str | Path,
    text_files: list[str],
    device: torch.device,
    seq_len: int = 128,
    batch_size: int = 32,
    cache_dir: str = ".cache/tcd_ds",
    seed: int = 0,
) -> dict[str, float]:
    """{"loss", "accuracy", "masked_tokens"} over every block of the text (blocks of min(seq_len, max position))."""
    register_auto_classes()
    dense = AutoConfig.from_pretrained(str(model_dir)).model_type == "bert"  # a teacher: run its head sparsely too
    model = (BertForSparseMaskedLM if dense else AutoModelForMaskedLM).from_pretrained(str(model_dir)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    seq_len = min(seq_len, model.config.max_position_embeddings)
    blocks, _ = build_block_dataset(text_files, tokenizer, seq_len, cache_dir)
    batches = validation_batches(blocks, tokenizer, min(batch_size, len(blocks)), None, 0, 1, seed)
    loss_sum, correct, count = mlm_sums(model, batches, device).tolist()
    return {"loss": loss_sum / count, "accuracy": correct / count, "masked_tokens": int(count)}
