import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

import tcd_ds.data.tokenizer as tokenizer_module
from tcd_ds.data.blocks import tokenizer_identity
from tcd_ds.data.tokenizer import SPM_MODEL_FILE, build_tokenizer, load_tokenizer
from tcd_ds.resources import BUNDLED

WIKI_VALIDATION = BUNDLED / "wiki" / "validation.txt"
VOCAB = 1000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "wiki.txt").write_bytes(WIKI_VALIDATION.read_bytes())
    return folder


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return build_tokenizer([str(corpus)], VOCAB, str(tmp_path_factory.mktemp("cache")))


def _only_folder(cache: Path) -> Path:
    (folder,) = (cache / "tokenizers").iterdir()
    return folder


def test_special_token_ids(tokenizer):
    assert len(tokenizer) == VOCAB
    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [tokenizer.convert_tokens_to_ids(t) for t in names] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id) == (0, 1, 2)
    assert (tokenizer.sep_token_id, tokenizer.mask_token_id) == (3, 4)
    ids = tokenizer("first text", "second [MASK] text")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2 and 4 in ids


def test_training_is_deterministic_across_independent_caches(corpus, tmp_path):
    a = build_tokenizer([str(corpus)], VOCAB, str(tmp_path / "a"))
    b = build_tokenizer([str(corpus)], VOCAB, str(tmp_path / "b"))
    assert a.get_vocab() == b.get_vocab()
    model_a = json.loads((_only_folder(tmp_path / "a") / "tokenizer.json").read_text())["model"]
    model_b = json.loads((_only_folder(tmp_path / "b") / "tokenizer.json").read_text())["model"]
    assert model_a == model_b  # pieces and their scores
    lines = WIKI_VALIDATION.read_text().splitlines()[:50]
    assert a(lines)["input_ids"] == b(lines)["input_ids"]


def test_second_call_is_a_cache_hit_and_options_change_the_key(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_tokenizer([str(corpus)], VOCAB, str(cache))

    def retrain(*args, **kwargs):
        raise RuntimeError("retrained")

    monkeypatch.setattr(tokenizer_module, "_train", retrain)
    again = build_tokenizer([str(corpus)], VOCAB, str(cache))
    assert again.get_vocab() == first.get_vocab()
    with pytest.raises(RuntimeError, match="retrained"):
        build_tokenizer([str(corpus)], VOCAB, str(cache), lowercase=True)


def test_autotokenizer_round_trip_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "saved"), local_files_only=True)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    texts = WIKI_VALIDATION.read_text().splitlines()[:100] + ["Ünïcödé ½ and  spaces\tand UPPER case [MASK] x"]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert reloaded.all_special_ids == tokenizer.all_special_ids
    assert tokenizer_identity(reloaded) == tokenizer_identity(tokenizer)  # block caches stay valid
    assert load_tokenizer(tmp_path / "saved")(texts)["input_ids"] == tokenizer(texts)["input_ids"]


def test_hf_tokenizer_segments_like_sentencepiece(corpus, tmp_path):
    """The `tokenizers` port against SentencePiece itself, on every corpus line."""
    tokenizer = build_tokenizer([str(corpus)], VOCAB, str(tmp_path))
    reference = spm.SentencePieceProcessor(model_file=str(_only_folder(tmp_path) / SPM_MODEL_FILE))
    lines = WIKI_VALIDATION.read_text().splitlines()
    ours = tokenizer(lines, add_special_tokens=False)["input_ids"]
    theirs = reference.encode(lines)
    differing = [i for i in range(len(lines)) if ours[i] != theirs[i]]
    # Viterbi ties (equal-score segmentations such as "..." + "." vs "." + "...") may break differently.
    assert len(differing) <= len(lines) // 100
    for i in differing:
        assert reference.decode(ours[i]) == reference.decode(theirs[i])
        ours_score, theirs_score = (sum(map(reference.get_score, ids)) for ids in (ours[i], theirs[i]))
        assert ours_score == pytest.approx(theirs_score)


def test_lowercase_option_folds_case(corpus, tmp_path):
    tokenizer = build_tokenizer([str(corpus)], VOCAB, str(tmp_path), lowercase=True)
    assert tokenizer("The HISTORY of Writing")["input_ids"] == tokenizer("the history of writing")["input_ids"]
