"""Text -> fixed-length `[CLS] ... [SEP]` token blocks for MLM pre-training, cached on disk per corpus."""

import hashlib
import itertools
import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from tcd_ds.data.cache import build_once, cache_key
from tcd_ds.data.text import CorpusError, TextLines, corpus_name, expand_paths, fingerprint, no_text

STATS_FILE = "stats.json"
_BLOCK_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})


@dataclass(frozen=True)
class HubText:
    """A text column of a Hugging Face hub dataset, used instead of local files (needs the network once)."""

    name: str
    config: str | None
    split: str
    text_column: str = "text"


def build_block_dataset(
    paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str,
    hub: HubText | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Blocks of `seq_len` ids cut from the corpus' token stream, and stats {lines, skipped_lines, tokens, blocks}.

    The stream is every line's tokens followed by `[SEP]`; block i is `[CLS]` + stream[i*(seq_len-2) :
    (i+1)*(seq_len-2)] + `[SEP]`, and the incomplete tail is dropped. Cached under
    `cache_dir/blocks/<hash of text, tokenizer, seq_len>`; lines that are not UTF-8 are skipped and counted.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS], a token, [SEP]), got {seq_len}")
    if hub is None:
        files = expand_paths(paths)
        source: dict = {"files": fingerprint(files)}
    else:
        hub_rows = datasets.load_dataset(hub.name, hub.config, split=hub.split)
        source = {"hub": asdict(hub), "fingerprint": hub_rows._fingerprint}
    key = cache_key(source=source, tokenizer=tokenizer_identity(tokenizer), seq_len=seq_len)

    def build(out: Path) -> None:
        lines = TextLines(files) if hub is None else _hub_lines(hub_rows, hub.text_column)
        try:
            stats = _build_blocks(lines, tokenizer, seq_len, out)
        except CorpusError as e:
            if hub is None and not lines.lines:
                raise no_text(lines) from None
            raise CorpusError(f"{corpus_name(files) if hub is None else f'hub dataset {hub.name}'}: {e}") from None
        stats["skipped_lines"] = lines.skipped if isinstance(lines, TextLines) else 0
        (out / STATS_FILE).write_text(json.dumps(stats, indent=1))

    folder = build_once(Path(cache_dir) / "blocks" / key, build)
    return datasets.load_from_disk(str(folder / "dataset")), json.loads((folder / STATS_FILE).read_text())


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocab, normaliser, special tokens): ids mean the same iff equal."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def pack_blocks(token_lists: Iterable[list[int]], seq_len: int, cls_id: int, sep_id: int) -> Iterator[list[int]]:
    """Concatenate lines, each closed by `sep_id`, and cut `[CLS] + seq_len-2 ids + [SEP]` blocks; drop the tail."""
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


def _build_blocks(lines: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, out: Path) -> dict:
    lines = iter(lines)
    first = next(lines, None)
    if first is None:
        raise CorpusError("no text to train on")
    # Intermediate arrow files go to a private folder, deleted once the blocks are saved; being private, they
    # need no content fingerprints (fixed names below spare `datasets` from pickling generators to hash them).
    with tempfile.TemporaryDirectory(dir=out) as work:
        text = datasets.Dataset.from_generator(
            lambda: ({"text": t} for t in itertools.chain([first], lines)), cache_dir=work, fingerprint="text"
        )
        tokens = text.map(
            lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=["text"],
            new_fingerprint="tokens",
        )
        num_tokens = sum(len(ids) for batch in tokens.iter(batch_size=1000) for ids in batch["ids"])
        if num_tokens + len(text) < seq_len - 2:
            raise CorpusError(f"corpus too small: {num_tokens} tokens make no block of {seq_len} (data.seq_len)")

        def blocks() -> Iterator[dict]:
            token_lists = (ids for batch in tokens.iter(batch_size=1000) for ids in batch["ids"])
            for block in pack_blocks(token_lists, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id):
                yield {"input_ids": block}

        # pack_blocks carries the stream across batches, which a batched `map` cannot; hence a generator.
        dataset = datasets.Dataset.from_generator(
            blocks, features=_BLOCK_FEATURES, cache_dir=work, fingerprint="blocks"
        )
        dataset.save_to_disk(str(out / "dataset"))
    return {"lines": len(text), "tokens": num_tokens, "blocks": len(dataset)}


def _hub_lines(rows: datasets.Dataset, column: str) -> Iterator[str]:
    for batch in rows.iter(batch_size=1000):
        for text in batch[column]:
            yield from (line.strip() for line in text.splitlines() if line.strip())
