"""MLM loss and accuracy of a converted model on out-of-domain text: the paper's probe of feature quality.

The text is cut into blocks and masked exactly as the pre-training validation set is (tcd_ds.data), with a fixed
seed, so models that share a tokenizer (a teacher and its students) are scored on the very same masked tokens,
and the numbers compare with the runs' in-domain `val/loss/mlm`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, BertForMaskedLM, PreTrainedModel

from tcd_ds.data.blocks import build_block_dataset
from tcd_ds.data.loader import validation_batches
from tcd_ds.hf import MoEBertForMaskedLM

MLM_CLASSES = {"bert": BertForMaskedLM, "moe_bert": MoEBertForMaskedLM}


def load_mlm(model_dir: str | Path) -> PreTrainedModel:
    """The DeepSpeed-free MLM class for the directory's model type: chosen explicitly, not through
    `AutoModelForMaskedLM`, which maps `moe_bert` to the DeepSpeed training class once `tcd_ds.models` is imported."""
    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    if model_type not in MLM_CLASSES:
        raise ValueError(f"{model_dir}: model_type {model_type!r}, expected one of {sorted(MLM_CLASSES)}")
    return MLM_CLASSES[model_type].from_pretrained(str(model_dir)).eval()


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
    model = load_mlm(model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    seq_len = min(seq_len, model.config.max_position_embeddings)
    blocks, _ = build_block_dataset(text_files, tokenizer, seq_len, cache_dir)
    batches = validation_batches(blocks, tokenizer, min(batch_size, len(blocks)), None, 0, 1, seed)
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked = batch["labels"] != -100
        picked, labels = logits[masked].float(), batch["labels"][masked]
        loss_sum += F.cross_entropy(picked, labels, reduction="sum").item()
        correct += (picked.argmax(-1) == labels).sum().item()
        count += int(masked.sum())
    return {"loss": loss_sum / count, "accuracy": correct / count, "masked_tokens": count}
