"""Preparing a run's data: the same blocks for any number of tokenizing processes, one builder for racing
processes, nothing complete-looking after a killed build, a slow build that outlasts the collectives' timeout
of a 2-rank launch, and batches that are the per-sample definition whether built together or prefetched."""

import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import datasets
import pytest
import torch

import tcd_ds.data.stream as stream_module
from conftest import LAUNCH_ENV, REPO, TEACHER, launch_command
from tcd_ds.data.blocks import (
    BLOCKS_FILE, TEST_DELAY_ENV, HubText, build_block_dataset, pack_blocks, tokenizer_identity,
)
from tcd_ds.data.cache import LOCK_FILE, NotCached
from tcd_ds.data.loader import MLMBatches, PrefetchingBatches, masked_batch, seeded_generator
from tcd_ds.data.mlm import mask_tokens
from tcd_ds.data.prepare import prepare_data
from tcd_ds.data.text import sample_lines
from tcd_ds.data.tokenizer import build_tokenizer
from tcd_ds.spec import load_spec
from tcd_ds.resources import BUNDLED

WIKI_VALIDATION = BUNDLED / "wiki" / "validation.txt"
FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer([str(WIKI_VALIDATION)], 1000, str(tmp_path_factory.mktemp("tok")))


def test_blocks_are_the_same_for_one_and_two_processes_and_are_the_packed_stream(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "CHUNK_CHARS", 16_000)  # ~10 chunks: lines carried across every cut
    seq_len = 48
    one, stats_one = build_block_dataset([str(WIKI_VALIDATION)], tokenizer, seq_len, str(tmp_path / "a"), num_proc=1)
    two, stats_two = build_block_dataset([str(WIKI_VALIDATION)], tokenizer, seq_len, str(tmp_path / "b"), num_proc=2)
    assert stats_one == stats_two
    assert one.data.table.equals(two.data.table)
    lines = [line.strip() for line in WIKI_VALIDATION.read_text().splitlines() if line.strip()]
    reference = pack_blocks(tokenizer(lines, add_special_tokens=False)["input_ids"], seq_len,
                            tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert one["input_ids"][:] == list(reference)


def _head(path: Path, lines: int) -> Path:
    """A second, smaller corpus: the first lines of the bundled validation text."""
    path.write_text("\n".join(WIKI_VALIDATION.read_text().splitlines()[:lines]) + "\n")
    return path


def _spec(cache: Path):
    validation = _head(cache.parent / f"{cache.name}-validation.txt", 60)
    return load_spec(None, [
        f"--data.train=[{WIKI_VALIDATION}]", f"--data.validation=[{validation}]", "--data.seq_len=64",
        "--data.tokenizer.vocab_size=500", f"--data.cache_dir={cache}",
    ])


def _prepare_in_child(cache: Path, delay: float, results) -> None:
    os.environ[TEST_DELAY_ENV] = str(delay)
    data = prepare_data(_spec(cache).data)
    results.put((tokenizer_identity(data.tokenizer), data.train["input_ids"][:], data.validation["input_ids"][:]))


def test_two_processes_racing_on_an_empty_cache_build_it_once(tmp_path, capfd):
    cache = tmp_path / "cache"
    results = FORK.Queue()
    racers = [FORK.Process(target=_prepare_in_child, args=(cache, 2.0, results)) for _ in range(2)]
    for p in racers:
        p.start()
    got = [results.get(timeout=120) for _ in racers]
    for p in racers:
        p.join(timeout=30)
    assert [p.exitcode for p in racers] == [0, 0]
    assert got[0] == got[1]
    out = capfd.readouterr()
    log = out.out + out.err
    assert log.count("trained a 500-piece tokenizer") == 1
    assert log.count("[tcd-ds] tokenized") == 2  # train and validation blocks, by one of the two
    assert "waiting for" in log and "to finish building the data cache" in log
    assert not (cache / LOCK_FILE).exists()


def test_a_killed_build_leaves_nothing_that_looks_complete(tmp_path, capfd):
    cache = tmp_path / "cache"
    builder = FORK.Process(target=_prepare_in_child, args=(cache, 600.0, FORK.Queue()))
    builder.start()
    deadline = time.time() + 120
    while not list((cache / "blocks").glob(f".*.tmp-*/{BLOCKS_FILE}")):  # half-way: blocks being written
        assert builder.is_alive() and time.time() < deadline
        time.sleep(0.1)
    os.kill(builder.pid, signal.SIGKILL)
    builder.join()
    assert str(builder.pid) in (cache / LOCK_FILE).read_text()

    spec = _spec(cache)
    tokenizer = build_tokenizer(spec.data.train, 500, str(cache), cached_only=True)  # built before the kill
    with pytest.raises(NotCached):
        build_block_dataset(spec.data.train, tokenizer, 64, str(cache), cached_only=True)

    capfd.readouterr()
    data = prepare_data(spec.data)  # breaks the dead builder's lock, deletes its half-built folder, builds
    assert "removed a stale build lock" in capfd.readouterr().err
    assert [p.name.startswith(".") for p in (cache / "blocks").iterdir()] == [False, False]  # train, validation
    assert not (cache / LOCK_FILE).exists()
    lines = [line for line in WIKI_VALIDATION.read_text().splitlines() if line.strip()]
    assert data.train_stats["lines"] == len(lines) and len(data.train) == data.train_stats["blocks"] > 0


def test_batches_are_the_per_sample_definition_built_together_and_prefetched(tokenizer):
    rows = torch.randint(5, len(tokenizer), (40, 32), generator=torch.Generator().manual_seed(0))
    rows[:, 0], rows[:, -1], rows[3, 20:] = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    blocks, samples = [7, 3, 3, 12], range(100, 104)
    batch = masked_batch(dataset, blocks, samples, tokenizer, 0.3, 5, "train")
    for row, (block, n) in enumerate(zip(blocks, samples)):
        ids, labels = mask_tokens(rows[block], tokenizer.all_special_ids, len(tokenizer), tokenizer.mask_token_id,
                                  0.3, seeded_generator(5, "train", n))
        assert torch.equal(batch["input_ids"][row], ids) and torch.equal(batch["labels"][row], labels)

    def make():
        return MLMBatches(dataset, tokenizer, global_batch_size=8, micro_batch_size=2, rank=1, world_size=2, seed=3)

    plain, prefetched = make(), PrefetchingBatches(make())
    prefetched.first_sample = plain.first_sample = 6  # an elastic resume's offset reaches the wrapped batches
    for step in [0, 1, 2, 5, 6]:  # a jump is built on the spot
        for a, b in zip(plain.micro_batches(step), prefetched.micro_batches(step), strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_data_build_longer_than_the_collective_timeout_does_not_kill_a_2_rank_launch(tmp_path):
    """Before: local rank 0 tokenized while rank 1 waited in a barrier, and gloo killed it after the collective
    timeout (here shortened to 15 s)."""
    command = launch_command(
        TEACHER, f"--run_dir={tmp_path / 'run'}", f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.train=[{_head(tmp_path / 'train.txt', 200)}]", "--data.tokenizer.vocab_size=500",
        "--parallel.timeout_minutes=0.25", "--train.steps=1", "--train.eval_batches=1", "--logging.progress_bar=False",
    )
    env = {**LAUNCH_ENV, TEST_DELAY_ENV: "18"}  # the builder sleeps 18 s after its first chunk of blocks
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("[tcd-ds] tokenized") == 2 and "to finish building the data cache" in log
    assert "[tcd-ds] finished" in log


def test_a_hub_style_dataset_is_streamed_to_the_blocks_of_its_lines_and_maps_without_its_source(tokenizer, tmp_path):
    """A local `datasets` folder stands in for the hub (no network in tests): documents of several lines."""
    lines = [line for line in WIKI_VALIDATION.read_text().splitlines() if line.strip()][:120]
    documents = ["\n".join(lines[i : i + 7]) + "\n\n" for i in range(0, len(lines), 7)]
    source = tmp_path / "hub_dataset"
    source.mkdir()
    datasets.Dataset.from_dict({"body": documents}).to_parquet(str(source / "train.parquet"))
    text = _head(tmp_path / "same.txt", 0)
    text.write_text("\n".join(lines) + "\n")
    hub = HubText(name=str(source), config=None, split="train", text_column="body")

    streamed, stats = build_block_dataset([], tokenizer, 32, str(tmp_path / "cache"), hub=hub)
    from_file, file_stats = build_block_dataset([str(text)], tokenizer, 32, str(tmp_path / "cache"))
    assert streamed["input_ids"][:] == from_file["input_ids"][:]
    assert {**stats, "skipped_lines": 0} == {**file_stats, "skipped_lines": 0}
    trained = build_tokenizer([], 300, str(tmp_path / "cache"), max_sentences=101, hub=hub)  # 101 shuffled lines
    assert len(trained) == 300

    source.rename(tmp_path / "gone")  # as on a compute node without the hub: the recorded revision is used
    again, _ = build_block_dataset([], tokenizer, 32, str(tmp_path / "cache"), hub=hub, cached_only=True)
    assert again["input_ids"][:] == from_file["input_ids"][:]


def test_sampled_tokenizer_lines_are_whole_corpus_lines_bounded_and_seeded(tmp_path):
    corpus = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for k, path in enumerate(corpus):
        path.write_text("".join(f"file {k} line {i} " + "x" * (i % 50) + "\n" for i in range(3000)))
    everything = {line.strip() for path in corpus for line in path.read_text().splitlines()}
    sample = list(sample_lines(corpus, 500, seed=1, window=50))
    assert len(sample) <= 500 and set(sample) <= everything and len(set(sample)) == len(sample)
    assert {line.split()[1] for line in sample} == {"0", "1"}  # from both files
    assert sample == list(sample_lines(corpus, 500, seed=1, window=50)) != list(sample_lines(corpus, 500, 2, 50))
