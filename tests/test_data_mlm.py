import math

import torch

from tcd_ds.data.mlm import IGNORE_INDEX, mask_tokens, mlm_batch

VOCAB, MASK_ID = 500, 4
SPECIAL = [0, 1, 2, 3, 4]


def _within(observed: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    """|observed - trials*p| within `sigmas` binomial standard deviations."""
    return abs(observed - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


def _batch(seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (256, 128), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP], as the blocks are
    ids[:5, 60:] = 0  # some padding
    return ids


def test_masking_statistics_follow_bert():
    ids = _batch()
    corrupted, labels = mask_tokens(ids, SPECIAL, VOCAB, MASK_ID, 0.15, torch.Generator().manual_seed(1))

    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in SPECIAL:
        special |= ids == s
    selected = labels != IGNORE_INDEX

    assert not selected[special].any()
    assert torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(corrupted[~selected], ids[~selected])  # unselected positions are untouched

    n_regular, n_selected = int((~special).sum()), int(selected.sum())
    assert _within(n_selected, n_regular, 0.15)

    masked = selected & (corrupted == MASK_ID)
    randomised = selected & (corrupted != MASK_ID) & (corrupted != ids)
    kept = selected & (corrupted == ids)
    assert int(masked.sum() + randomised.sum() + kept.sum()) == n_selected
    n_regular_ids = VOCAB - len(SPECIAL)
    p_random_differs = 0.1 * (1 - 1 / n_regular_ids)  # a random id may draw the original one
    assert _within(int(masked.sum()), n_selected, 0.8)
    assert _within(int(randomised.sum()), n_selected, p_random_differs)
    assert _within(int(kept.sum()), n_selected, 1 - 0.8 - p_random_differs)
    assert not any(int(t) in SPECIAL for t in corrupted[randomised])

    # random replacements are spread over the regular vocabulary, not a few ids
    assert len(set(corrupted[randomised].tolist())) > 0.5 * min(int(randomised.sum()), n_regular_ids)


def test_masking_is_a_function_of_the_generator_state():
    ids = _batch()
    a = mask_tokens(ids, SPECIAL, VOCAB, MASK_ID, 0.15, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, torch.tensor(SPECIAL), VOCAB, MASK_ID, 0.15, torch.Generator().manual_seed(7))
    c = mask_tokens(ids, SPECIAL, VOCAB, MASK_ID, 0.15, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(ids, _batch())  # the input is not modified in place


def test_mask_prob_extremes():
    ids = _batch()
    none = mask_tokens(ids, SPECIAL, VOCAB, MASK_ID, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none[0], ids) and (none[1] == IGNORE_INDEX).all()
    everything = mask_tokens(ids, SPECIAL, VOCAB, MASK_ID, 1.0, torch.Generator().manual_seed(0))
    regular = ~torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(everything[1] != IGNORE_INDEX, regular)


def test_a_batch_without_padding_has_no_attention_mask():
    """All-ones masks cost every BERT forward a device read (transformers' `padding_mask.all()`): none is passed
    where the blocks have no padding; the masked positions come precomputed."""
    ids = torch.arange(12).reshape(2, 6)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2], labels[1, 5] = 7, 9
    full = mlm_batch(ids, labels, torch.ones_like(ids, dtype=torch.bool))
    assert full.keys() == {"input_ids", "labels", "masked_positions"}
    assert full["masked_positions"].tolist() == [2, 11]
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, 4:] = False
    padded = mlm_batch(ids, labels, real)
    assert torch.equal(padded["attention_mask"], real.long())
