
import pytest

import tcd_ds.data.blocks as blocks_module
from tcd_ds.data.blocks import build_block_dataset, pack_blocks
from tcd_ds.data.tokenizer import build_tokenizer
from tcd_ds.resources import BUNDLED

WIKI_VALIDATION = BUNDLED / "wiki" / "validation.txt"
C, S = 100, 101  # stand-ins for [CLS] and [SEP]


def test_pack_blocks_by_hand():
    lines = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    # stream: 1 2 3 S 4 5 S 6 7 8 9 S 10 S  (14 ids) -> 4 bodies of 3, the last 2 ids dropped
    assert list(pack_blocks(lines, seq_len=5, cls_id=C, sep_id=S)) == [
        [C, 1, 2, 3, S],
        [C, S, 4, 5, S],
        [C, S, 6, 7, S],
        [C, 8, 9, S, S],
    ]


def test_pack_blocks_splits_a_line_longer_than_many_blocks():
    assert list(pack_blocks([list(range(1, 8))], seq_len=4, cls_id=C, sep_id=S)) == [
        [C, 1, 2, S], [C, 3, 4, S], [C, 5, 6, S], [C, 7, S, S],
    ]
    assert list(pack_blocks([[1]], seq_len=5, cls_id=C, sep_id=S)) == []


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer([str(WIKI_VALIDATION)], 1000, str(tmp_path_factory.mktemp("tok")))


def test_blocks_match_a_naive_packing_of_the_corpus(tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = WIKI_VALIDATION.read_text().splitlines()[:60]
    (corpus / "a.txt").write_text("\n".join(text[:30]) + "\n")
    (corpus / "b.txt").write_bytes(("\n".join(text[30:]) + "\n").encode() + b"bad \xff line\n\n")
    seq_len = 64

    dataset, stats = build_block_dataset([str(corpus)], tokenizer, seq_len, str(tmp_path / "cache"))

    stream = []
    for line in text:
        stream += tokenizer.encode(line, add_special_tokens=False) + [tokenizer.sep_token_id]
    body = seq_len - 2
    expected = [
        [tokenizer.cls_token_id] + stream[i : i + body] + [tokenizer.sep_token_id]
        for i in range(0, len(stream) - body + 1, body)
    ]
    assert dataset["input_ids"][:] == expected
    assert stats == {"lines": 60, "skipped_lines": 1, "tokens": len(stream) - 60, "blocks": len(stream) // body}


def test_second_call_loads_from_cache_and_seq_len_changes_the_key(tokenizer, tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(WIKI_VALIDATION.read_text().splitlines()[:20]))
    first, stats = build_block_dataset([str(corpus)], tokenizer, 32, str(tmp_path / "cache"))

    def rebuild(*args, **kwargs):
        raise RuntimeError("rebuilt")

    monkeypatch.setattr(blocks_module, "_build_blocks", rebuild)
    again, stats_again = build_block_dataset([str(corpus)], tokenizer, 32, str(tmp_path / "cache"))
    assert again["input_ids"][:] == first["input_ids"][:] and stats_again == stats
    with pytest.raises(RuntimeError, match="rebuilt"):
        build_block_dataset([str(corpus)], tokenizer, 48, str(tmp_path / "cache"))


def test_a_corpus_too_small_for_one_block_is_an_error(tokenizer, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Just a few words.\n")
    with pytest.raises(ValueError, match="too small"):
        build_block_dataset([str(corpus)], tokenizer, 512, str(tmp_path / "cache"))
