
import datasets
import pytest
import torch

from tcd_ds.data.loader import MLMBatches, validation_batches
from tcd_ds.data.mlm import IGNORE_INDEX
from tcd_ds.data.tokenizer import build_tokenizer
from tcd_ds.resources import BUNDLED

WIKI_VALIDATION = BUNDLED / "wiki" / "validation.txt"
NUM_BLOCKS, SEQ_LEN = 10, 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer([str(WIKI_VALIDATION)], 1000, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def dataset():
    """Block b is [CLS] 100+b ... [SEP], with a padded tail, so a block is recognisable from any of its ids."""
    rows = []
    for b in range(NUM_BLOCKS):
        body = [100 + b] * (SEQ_LEN - 5) + [100 + b + 50 * k for k in range(1, 3)]
        rows.append([2, *body, 3, 0])
    return datasets.Dataset.from_dict({"input_ids": rows})


def _originals(batch) -> torch.Tensor:
    """Undo the masking with the labels: the blocks the batch was made from."""
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def _block_ids(batch) -> list[int]:
    return [int(row[1]) - 100 for row in _originals(batch)]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(batch: dict) -> dict:
    """The per-row tensors of a batch; `masked_positions` (flat indices into the micro-batch) derive from them."""
    return {k: v for k, v in batch.items() if k != "masked_positions"}


def _concat(parts: list[dict]) -> dict:
    return {k: torch.cat([_rows(p)[k] for p in parts]) for k in _rows(parts[0])}


def test_batches_are_well_formed(dataset, tokenizer):
    batches = MLMBatches(dataset, tokenizer, global_batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=3)
    micro = batches.micro_batches(0)
    assert len(micro) == batches.grad_accum == 2
    rows = torch.tensor(dataset["input_ids"][:])
    for batch in micro:
        masked = (batch["labels"].reshape(-1) != IGNORE_INDEX).sum().item()
        assert {k: tuple(v.shape) for k, v in batch.items()} == {
            "input_ids": (2, SEQ_LEN), "attention_mask": (2, SEQ_LEN), "labels": (2, SEQ_LEN),
            "masked_positions": (masked,),
        }
        assert torch.equal(batch["labels"].reshape(-1)[batch["masked_positions"]] != IGNORE_INDEX,
                           torch.ones(masked, dtype=torch.bool))
        originals = _originals(batch)
        assert all(any(torch.equal(o, r) for r in rows) for o in originals)  # labels restore the true ids
        assert torch.equal(batch["attention_mask"], (originals != 0).long())
        assert (batch["labels"][:, [0, -2, -1]] == IGNORE_INDEX).all()  # [CLS], [SEP], [PAD] never masked
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro) > 0


def test_resuming_gives_the_batches_of_an_uninterrupted_run(dataset, tokenizer):
    def make():
        return MLMBatches(dataset, tokenizer, global_batch_size=4, micro_batch_size=2, rank=0, world_size=1, seed=5)

    uninterrupted = make()
    history = [uninterrupted.micro_batches(step) for step in range(7)]
    resumed = make()
    for step in (4, 5, 6):
        assert all(_equal(a, b) for a, b in zip(resumed.micro_batches(step), history[step]))
    assert not _equal(history[0][0], history[1][0])


def test_ranks_together_see_what_one_process_with_a_larger_micro_batch_sees(dataset, tokenizer):
    common = dict(dataset=dataset, tokenizer=tokenizer, global_batch_size=8, seed=11)
    single = MLMBatches(**common, micro_batch_size=4, rank=0, world_size=1)
    ranks = [MLMBatches(**common, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for step in range(4):
        for j, whole in enumerate(single.micro_batches(step)):
            parts = [r.micro_batches(step)[j] for r in ranks]
            assert _equal(_rows(whole), _concat(parts))


def test_each_epoch_is_a_permutation_and_epochs_differ(dataset, tokenizer):
    batches = MLMBatches(dataset, tokenizer, global_batch_size=4, micro_batch_size=2, rank=0, world_size=1, seed=0)
    seen = [b for step in range(5) for micro in batches.micro_batches(step) for b in _block_ids(micro)]  # 20 samples
    first, second = seen[:NUM_BLOCKS], seen[NUM_BLOCKS:]
    assert sorted(first) == sorted(second) == list(range(NUM_BLOCKS))
    assert first != second
    # step 2 spans the epoch boundary (samples 8..11): its blocks are the ends and starts of the two orders
    assert [b for micro in batches.micro_batches(2) for b in _block_ids(micro)] == first[8:] + second[:2]
    other_seed = MLMBatches(dataset, tokenizer, global_batch_size=4, micro_batch_size=2, rank=0, world_size=1, seed=1)
    assert [b for step in range(3) for m in other_seed.micro_batches(step) for b in _block_ids(m)] != first


def test_invalid_batch_geometry_is_refused(dataset, tokenizer):
    with pytest.raises(ValueError, match="multiple"):
        MLMBatches(dataset, tokenizer, global_batch_size=6, micro_batch_size=2, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        MLMBatches(dataset, tokenizer, global_batch_size=12, micro_batch_size=2, rank=0, world_size=2, seed=0)


def test_validation_batches_are_fixed_and_sharded(dataset, tokenizer):
    whole = validation_batches(dataset, tokenizer, micro_batch_size=4, num_batches=None, rank=0, world_size=1, seed=2)
    assert len(whole) == 2 and [_block_ids(b) for b in whole] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(_equal(a, b) for a, b in zip(whole, validation_batches(dataset, tokenizer, 4, None, 0, 1, seed=2)))
    shards = [validation_batches(dataset, tokenizer, 2, 2, rank=r, world_size=2, seed=2) for r in range(2)]
    for b, batch in enumerate(whole):
        assert _equal(_rows(batch), _concat([shards[0][b], shards[1][b]]))
    with pytest.raises(ValueError, match="validation batches"):
        validation_batches(dataset, tokenizer, 4, 3, rank=0, world_size=1, seed=2)
