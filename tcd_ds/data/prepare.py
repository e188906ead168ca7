"""Everything a run's data section needs (tokenizer, train and validation blocks), built once per cache.

A launch calls `prepare_data` on every rank before the process group exists: a complete cache is mapped; a
missing one is built by exactly one process across all the nodes that share `data.cache_dir` (the cache lock),
while the others wait on the lock and say so. No rank waits inside a collective, whose timeout
(`parallel.timeout_minutes`) would otherwise bound how long a corpus may take to tokenize. For a big corpus,
`tools/prepare_data.py` builds the same cache ahead of the job, with every core of one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from tcd_ds.data.blocks import HubText, build_block_dataset
from tcd_ds.data.cache import NotCached, cache_lock
from tcd_ds.data.tokenizer import build_tokenizer, load_tokenizer
from tcd_ds.spec import DataSpec


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    train: datasets.Dataset
    train_stats: dict
    validation: datasets.Dataset


def prepare_data(data: DataSpec, num_proc: int | None = None, progress: bool = False) -> PreparedData:
    """The data of a run spec's `data` section, from the cache, building what is missing under the cache lock.

    `num_proc`: tokenizing processes (None: every core, for a corpus over 32 MB)."""
    try:
        return _resolve(data, cached_only=True)
    except NotCached:
        pass
    with cache_lock(data.cache_dir, "the data cache"):  # the holder may have built it while this one waited
        return _resolve(data, cached_only=False, num_proc=num_proc, progress=progress)


def _resolve(data: DataSpec, cached_only: bool, num_proc: int | None = None, progress: bool = False) -> PreparedData:
    hub = HubText(**data.hub.model_dump()) if data.hub else None
    if data.tokenizer.path:
        tokenizer = load_tokenizer(data.tokenizer.path)
    else:
        tokenizer = build_tokenizer(
            data.train, data.tokenizer.vocab_size, data.cache_dir, hub=hub, cached_only=cached_only
        )
    blocks = dict(seq_len=data.seq_len, cache_dir=data.cache_dir, num_proc=num_proc, progress=progress,
                  cached_only=cached_only)
    train, train_stats = build_block_dataset(data.train, tokenizer, hub=hub, **blocks)
    validation, _ = build_block_dataset(data.validation, tokenizer, **blocks)
    return PreparedData(tokenizer, train, train_stats, validation)
