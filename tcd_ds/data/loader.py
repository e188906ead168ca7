"""Which masked samples each rank sees at each step: a pure function of (seed, step, rank, world size).

Global sample n of the training stream is block perm_e[n mod N] with e = n // N, perm_e a permutation
seeded by (seed, e); its masking is seeded by (seed, n). Step k consumes samples [k*G, (k+1)*G), micro-step
j of it samples [k*G + j*m*W, k*G + (j+1)*m*W), of which rank r takes the r-th slice of m. So a resumed run
sees exactly the batches an uninterrupted one would, and W ranks together see what one process with a W
times larger micro-batch would.
"""

import hashlib

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from tcd_ds.data.mlm import mask_tokens
from tcd_ds.data.text import CorpusError
from tcd_ds.spec import grad_accum_steps

Batch = dict[str, torch.Tensor]


def seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `key`: independent streams for (seed, purpose, index) tuples."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class MLMBatches:
    """The training micro-batches of one rank, by step."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        mask_prob: float = 0.15,
    ):
        self.grad_accum = grad_accum_steps(global_batch_size, micro_batch_size, world_size)
        if len(dataset) < global_batch_size:
            raise CorpusError(f"the training corpus makes {len(dataset)} blocks, fewer than one global batch "
                              f"({global_batch_size}, train.global_batch_size): give more text")
        self.dataset = dataset.with_format("torch", columns=["input_ids"])
        self.tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.mask_prob = mask_prob
        self._permutations: dict[int, torch.Tensor] = {}
        self.first_sample = 0  # where step 0 starts in the stream; moved on an elastic resume (consumed samples)

    def micro_batches(self, step: int) -> list[Batch]:
        """This rank's `grad_accum` micro-batches of training step `step` (0-based)."""
        batches = []
        for micro_step in range(self.grad_accum):
            first = (
                self.first_sample
                + step * self.global_batch_size
                + (micro_step * self.world_size + self.rank) * self.micro_batch_size
            )
            samples = range(first, first + self.micro_batch_size)
            blocks = [self._block_of(n) for n in samples]
            batches.append(
                masked_batch(self.dataset, blocks, samples, self.tokenizer, self.mask_prob, self.seed, "train")
            )
        return batches

    def _block_of(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self.dataset))
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a step spans at most two epochs
                del self._permutations[min(self._permutations)]
            generator = seeded_generator(self.seed, "epoch", epoch)
            self._permutations[epoch] = torch.randperm(len(self.dataset), generator=generator)
        return int(self._permutations[epoch][position])


def validation_batches(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    micro_batch_size: int,
    num_batches: int | None,
    rank: int,
    world_size: int,
    seed: int,
    mask_prob: float = 0.15,
) -> list[Batch]:
    """A fixed validation set: `num_batches` micro-batches per rank (None: as many as the data fills).

    Batch b of rank r holds blocks [(b*W + r)*m, (b*W + r + 1)*m), masked the same way in every call, so
    validation losses are comparable across steps, runs and world sizes.
    """
    available = len(dataset) // (micro_batch_size * world_size)
    num_batches = available if num_batches is None else num_batches
    if not 0 < num_batches <= available:
        raise CorpusError(
            f"{num_batches} validation batches of {micro_batch_size} x {world_size} ranks asked (train.eval_batches),"
            f" the validation corpus' {len(dataset)} blocks hold {available}"
        )
    dataset = dataset.with_format("torch", columns=["input_ids"])
    batches = []
    for b in range(num_batches):
        first = (b * world_size + rank) * micro_batch_size
        samples = range(first, first + micro_batch_size)
        batches.append(masked_batch(dataset, list(samples), samples, tokenizer, mask_prob, seed, "validation"))
    return batches


def masked_batch(
    dataset: datasets.Dataset,
    blocks: list[int],
    samples: range,
    tokenizer: PreTrainedTokenizerBase,
    mask_prob: float,
    seed: int,
    stream: str,
) -> Batch:
    """Blocks as an MLM batch; sample n is masked with its own generator, so batching never changes it."""
    input_ids = dataset[blocks]["input_ids"].long()
    corrupted, labels = zip(*(
        mask_tokens(
            ids,
            special_ids=tokenizer.all_special_ids,
            vocab_size=len(tokenizer),
            mask_id=tokenizer.mask_token_id,
            mask_prob=mask_prob,
            generator=seeded_generator(seed, stream, n),
        )
        for ids, n in zip(input_ids, samples)
    ))
    return {
        "input_ids": torch.stack(corrupted),
        "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
        "labels": torch.stack(labels),
    }
