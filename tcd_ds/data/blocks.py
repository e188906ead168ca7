"""Text -> fixed-length `[CLS] ... [SEP]` token blocks for MLM pre-training, cached on disk per corpus."""

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from tcd_ds.data.cache import build_once, cache_key
from tcd_ds.data.stream import default_num_proc, token_stream
from tcd_ds.data.text import CorpusError, TextLines, corpus_name, expand_paths, fingerprint, no_text

STATS_FILE = "stats.json"
BLOCKS_FILE = "blocks.arrow"
LAYOUT = 2  # 2: one memory-mapped arrow file written while packing (1 was a `save_to_disk` folder)
# Tests only: seconds the first block build of a process sleeps after its first chunk (a slow or killable build).
TEST_DELAY_ENV = "TCD_DS_TEST_BUILD_DELAY_S"
_BLOCK_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})


@dataclass(frozen=True)
class HubText:
    """A text column of a Hugging Face hub dataset (or a local `datasets` folder), streamed, not downloaded whole."""

    name: str
    config: str | None
    split: str
    text_column: str = "text"

    def identity(self, cache_dir: str) -> dict:
        """What the dataset's content is keyed by: the builder's hash (the hub revision; local files' contents).

        Recorded under `cache_dir/hub/` when resolved, and read back where it cannot be (a compute node without
        the network, mapping a cache that `tools/prepare_data.py` built where the hub was reachable)."""
        record = Path(cache_dir) / "hub" / f"{cache_key(**asdict(self))}.json"
        try:
            builder_hash = datasets.load_dataset_builder(self.name, self.config).hash
        except Exception as e:  # offline, or unreachable: the errors vary with the datasets version
            if not record.is_file():
                raise RuntimeError(
                    f"cannot resolve the hub dataset {self.name} ({type(e).__name__}: {e}) and no data cache under "
                    f"{cache_dir} names it: run tools/prepare_data.py where the hub is reachable"
                ) from e
            builder_hash = json.loads(record.read_text())["hash"]
        else:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"hub": asdict(self), "hash": builder_hash}))
            os.replace(tmp, record)
        return {"hub": asdict(self), "hash": builder_hash}

    def rows(self) -> datasets.IterableDataset:
        return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)

    def lines(self, rows: Iterable[dict] | None = None) -> Iterator[str]:
        """Stripped non-empty lines of the text column (a row holds a document, one paragraph per line)."""
        for row in self.rows() if rows is None else rows:
            yield from (line.strip() for line in row[self.text_column].splitlines() if line.strip())


def build_block_dataset(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str,
    hub: HubText | None = None,
    num_proc: int | None = None,
    progress: bool = False,
    cached_only: bool = False,
) -> tuple[datasets.Dataset, dict]:
    """Blocks of `seq_len` ids cut from the corpus' token stream, and stats {lines, skipped_lines, tokens, blocks}.

    The stream is every line's tokens followed by `[SEP]`; block i is `[CLS]` + stream[i*(seq_len-2) :
    (i+1)*(seq_len-2)] + `[SEP]`, and the incomplete tail is dropped. Cached under
    `cache_dir/blocks/<hash of text, tokenizer, seq_len>`; lines that are not UTF-8 are skipped and counted.
    Tokenized by `num_proc` processes (None: all cores for a corpus over 32 MB), with the same blocks for any
    number. `cached_only`: raise `NotCached` rather than build.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS], a token, [SEP]), got {seq_len}")
    if hub is None:
        files = expand_paths(paths)
        source: dict = {"files": fingerprint(files)}
        corpus_bytes = sum(f.stat().st_size for f in files)
    else:
        source, corpus_bytes = hub.identity(cache_dir), None
    key = cache_key(source=source, tokenizer=tokenizer_identity(tokenizer), seq_len=seq_len, layout=LAYOUT)

    def build(out: Path) -> None:
        lines = TextLines(files) if hub is None else hub.lines()
        procs = default_num_proc(corpus_bytes) if num_proc is None else num_proc
        bar = tqdm(total=corpus_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
        try:
            with bar:
                stats = _build_blocks(lines, tokenizer, seq_len, out, procs, bar)
        except CorpusError as e:
            if hub is None and not lines.lines:
                raise no_text(lines) from None
            raise CorpusError(f"{corpus_name(files) if hub is None else f'hub dataset {hub.name}'}: {e}") from None
        stats["skipped_lines"] = lines.skipped if isinstance(lines, TextLines) else 0
        (out / STATS_FILE).write_text(json.dumps(stats, indent=1))

    folder = build_once(Path(cache_dir) / "blocks" / key, build, cached_only=cached_only)
    return datasets.Dataset.from_file(str(folder / BLOCKS_FILE)), json.loads((folder / STATS_FILE).read_text())


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocab, normaliser, special tokens): ids mean the same iff equal."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def pack_blocks(token_lists: Iterable[list[int]], seq_len: int, cls_id: int, sep_id: int) -> Iterator[list[int]]:
    """Concatenate lines, each closed by `sep_id`, and cut `[CLS] + seq_len-2 ids + [SEP]` blocks; drop the tail.

    The definition, one line at a time; `_build_blocks` cuts the same blocks from array chunks of the stream."""
    body = seq_len - 2
    stream: list[int] = []
    for ids in token_lists:
        stream += ids
        stream.append(sep_id)
        start = 0
        while len(stream) - start >= body:
            yield [cls_id, *stream[start : start + body], sep_id]
            start += body
        del stream[:start]


def _build_blocks(
    lines: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, out: Path, num_proc: int = 1,
    progress: tqdm | None = None,
) -> dict:
    """Tokenize (in parallel) and pack (a vectorised cut of each chunk, carrying the remainder) into an arrow file."""
    body = seq_len - 2
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    carry = np.empty(0, dtype=np.int32)
    num_lines = stream_length = num_blocks = num_chunks = 0
    delay = float(os.environ.pop(TEST_DELAY_ENV, "0"))
    started = time.perf_counter()
    with ArrowWriter(features=_BLOCK_FEATURES, path=str(out / BLOCKS_FILE)) as writer:
        stream = token_stream(lines, tokenizer.backend_tokenizer.to_str(), sep_id, num_proc)
        for n, chunk in stream:
            num_lines += n
            num_chunks += 1
            stream_length += len(chunk)
            ids = np.concatenate([carry, chunk])
            count = len(ids) // body
            carry = ids[count * body :]
            if count:
                rows = np.empty((count, seq_len), dtype=np.int32)
                rows[:, 0], rows[:, -1] = cls_id, sep_id
                rows[:, 1:-1] = ids[: count * body].reshape(count, body)
                offsets = pa.array(np.arange(0, count * seq_len + 1, seq_len, dtype=np.int32))
                column = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))
                writer.write_table(pa.table({"input_ids": column}))
                num_blocks += count
            if progress is not None:
                progress.update((lines.bytes_read if isinstance(lines, TextLines) else num_lines) - progress.n)
            if delay:
                time.sleep(delay)  # a slow build, for the tests of what waits on it
                delay = 0
        writer.finalize()
    if num_lines == 0:
        raise CorpusError("no text to train on")
    tokens = stream_length - num_lines
    if num_blocks == 0:
        raise CorpusError(f"corpus too small: {tokens} tokens make no block of {seq_len} (data.seq_len)")
    seconds = time.perf_counter() - started
    procs = num_proc if num_chunks > 1 else 1
    print(f"[tcd-ds] tokenized {num_lines} lines, {tokens / 1e6:.2f}M tokens into {num_blocks} blocks of {seq_len}"
          f" in {seconds:.1f} s ({tokens / seconds / 1e6:.2f}M tokens/s, {procs} process(es))", flush=True)
    return {"lines": num_lines, "tokens": tokens, "blocks": num_blocks}
