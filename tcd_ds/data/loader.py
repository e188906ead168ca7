"""Which masked samples each rank sees at each step: a pure function of (seed, step, rank, world size).

Global sample n of the training stream is block perm_e[n mod N] with e = n // N, perm_e a permutation
seeded by (seed, e); its masking is seeded by (seed, n). Step k consumes samples [k*G, (k+1)*G), micro-step
j of it samples [k*G + j*m*W, k*G + (j+1)*m*W), of which rank r takes the r-th slice of m. So a resumed run
sees exactly the batches an uninterrupted one would, and W ranks together see what one process with a W
times larger micro-batch would.
"""

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from tcd_ds.data.mlm import apply_mask, mask_draws, mlm_batch, regular_ids
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
    """Blocks as an MLM batch; sample n is masked with its own generator, so batching never changes it.

    Only the draws are per sample (one seeded generator each: what makes a sample's masking independent of
    its batch); the masking itself runs once over the whole batch, on the same draws."""
    input_ids = dataset[blocks]["input_ids"].long()
    special = torch.as_tensor(tokenizer.all_special_ids, dtype=torch.long)
    regular = regular_ids(len(tokenizer), special)
    draws = [torch.empty(input_ids.shape), torch.empty(input_ids.shape), torch.empty(input_ids.shape, dtype=torch.long)]
    for row, n in enumerate(samples):
        drawn = mask_draws(input_ids.shape[1:], seeded_generator(seed, stream, n), len(regular))
        for whole, part in zip(draws, drawn):
            whole[row] = part
    corrupted, labels = apply_mask(input_ids, special, regular, *draws, tokenizer.mask_token_id, mask_prob)
    return mlm_batch(corrupted, labels, input_ids != tokenizer.pad_token_id)


class PrefetchingBatches:
    """`MLMBatches` whose next step is built on a background thread while the current step trains.

    `micro_batches(step)` returns what `batches.micro_batches(step)` would (the same pure function of the
    step), then starts building step + 1. On CUDA the tensors are pinned, so that the step's
    `.to(device, non_blocking=True)` copies run asynchronously. A call for another step than the one prefetched
    (or after `first_sample` moved) is built on the spot.
    """

    def __init__(self, batches: MLMBatches, pin_memory: bool = False):
        self.batches = batches
        self.pin_memory = pin_memory
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tcd-ds-batches")
        self._next: tuple[tuple[int, int], Future] | None = None

    def micro_batches(self, step: int) -> list[Batch]:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == (step, self.batches.first_sample):
            result = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # never two builds at once: MLMBatches caches its epoch permutations
            result = self._build(step)
        key = (step + 1, self.batches.first_sample)
        self._next = (key, self._executor.submit(self._build, step + 1))
        return result

    def _build(self, step: int) -> list[Batch]:
        micro = self.batches.micro_batches(step)
        if self.pin_memory:
            micro = [{k: v.pin_memory() for k, v in batch.items()} for batch in micro]
        return micro

    @property
    def first_sample(self) -> int:
        return self.batches.first_sample

    @first_sample.setter
    def first_sample(self, value: int) -> None:
        self.batches.first_sample = value

    def __getattr__(self, name: str):
        return getattr(self.batches, name)
