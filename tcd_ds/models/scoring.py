"""MLM loss and accuracy over masked batches: the validation of a run and the out-of-domain probe alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tcd_ds.data.mlm import masked_positions


@torch.no_grad()
def mlm_sums(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """fp64 `[loss sum, correct, masked tokens]` over the masked tokens of `batches` (host tensors), for the caller
    to pool (across ranks) before dividing. `model` runs in eval mode and is put back in the mode it was in."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        positions = batch["masked_positions"] if "masked_positions" in batch else masked_positions(batch["labels"])
        labels = batch["labels"].reshape(-1)[positions].to(device)
        mask = batch.get("attention_mask")  # none where the blocks have no padding (tcd_ds.data.mlm.mlm_batch)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device),
            masked_positions=positions.to(device),
        ).logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(-1) == labels).sum()
        sums[2] += labels.numel()
    model.train(was_training)
    return sums
