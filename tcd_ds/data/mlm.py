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
    regular = regular_ids(vocab_size, special)
    draws = mask_draws(input_ids.shape, generator, len(regular))
    return apply_mask(input_ids, special, regular, *draws, mask_id=mask_id, mask_prob=mask_prob)


def regular_ids(vocab_size: int, special: torch.Tensor) -> torch.Tensor:
    """The ids a random replacement may take: every non-special id."""
    is_regular = torch.ones(vocab_size, dtype=torch.bool)
    is_regular[special] = False
    return torch.arange(vocab_size)[is_regular]


def mask_draws(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, num_regular: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random numbers of `mask_tokens`, in its order: selection, action, which random id (on the CPU)."""
    device = generator.device
    select = torch.rand(shape, generator=generator, device=device)
    action = torch.rand(shape, generator=generator, device=device)
    pick = torch.randint(num_regular, shape, generator=generator, device=device)
    return select.cpu(), action.cpu(), pick.cpu()


def apply_mask(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    regular: torch.Tensor,
    select: torch.Tensor,
    action: torch.Tensor,
    pick: torch.Tensor,
    mask_id: int,
    mask_prob: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The corruption given the draws: elementwise, so rows drawn apart and masked together are masked alike."""
    device = input_ids.device
    selected = (select.to(device) < mask_prob) & ~torch.isin(input_ids, special.to(device))
    action = action.to(device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)

    corrupted = input_ids.clone()
    corrupted[to_mask] = mask_id
    # index_select on the chosen positions only: `regular[pick]` over a 2-D `pick` is 1000x slower on CPU
    chosen = regular.index_select(0, pick.to(device)[to_random].cpu())
    corrupted[to_random] = chosen.to(device=device, dtype=input_ids.dtype)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into B*T) of the labelled tokens: where the MLM head needs to run. Computed on the host copy
    of a batch, so that the device never waits on the data-dependent shape."""
    return labels.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)


def mlm_batch(input_ids: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch as the training step takes it, with what has a data-dependent shape worked out here, on the host,
    where the batch is built (the loader's thread): `masked_positions`, and an `attention_mask` only where a block
    has padding (`real` False). Packed pre-training blocks have none; passing all ones anyway costs every BERT
    forward a device read in transformers' mask check and SDPA its fused path."""
    batch = {"input_ids": input_ids, "labels": labels, "masked_positions": masked_positions(labels)}
    if not real.all():
        batch["attention_mask"] = real.long()
    return batch
