"""BERT's masked-language-model corruption (Devlin et al. 2019, section 3.1)."""

import torch

IGNORE_INDEX = -100  # what torch's cross entropy skips


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: list[int] | torch.Tensor,
    vocab_size: int,
    mask_id: int,
    mask_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (corrupted ids, labels) for a batch of ids.

    Each non-special token is selected with probability `mask_prob`; a selected token becomes `mask_id`
    (80%), a random non-special id (10%) or stays itself (10%). Labels hold the original id at selected
    positions and IGNORE_INDEX elsewhere. Random draws are made on the generator's device, so the result
    depends only on the generator's state, wherever `input_ids` lives.
    """
    special = torch.as_tensor(special_ids, dtype=torch.long)
    draw_device = generator.device
    shape = input_ids.shape
    select_draw = torch.rand(shape, generator=generator, device=draw_device)
    action_draw = torch.rand(shape, generator=generator, device=draw_device)
    is_regular = torch.ones(vocab_size, dtype=torch.bool)
    is_regular[special] = False
    regular_ids = torch.arange(vocab_size)[is_regular]
    random_ids = regular_ids[torch.randint(len(regular_ids), shape, generator=generator, device=draw_device).cpu()]

    device = input_ids.device
    selected = (select_draw.to(device) < mask_prob) & ~torch.isin(input_ids, special.to(device))
    action_draw = action_draw.to(device)
    to_mask = selected & (action_draw < 0.8)
    to_random = selected & (action_draw >= 0.8) & (action_draw < 0.9)

    corrupted = input_ids.clone()
    corrupted[to_mask] = mask_id
    corrupted[to_random] = random_ids.to(device=device, dtype=input_ids.dtype)[to_random]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*T) of the labelled tokens: where the MLM head needs to run. Computed on the host copy
    of a batch, so that the device never waits on the data-dependent shape."""
    return labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)
