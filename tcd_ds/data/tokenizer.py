"""A SentencePiece unigram vocabulary, trained once per corpus and served as a Hugging Face fast tokenizer.

SentencePiece trains it (deterministically); the `tokenizers` library runs it, so that the saved folder
loads with `transformers.AutoTokenizer` anywhere, with no project code and no sentencepiece install.
"""

import contextlib
import itertools
import re
import time
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tcd_ds.data.blocks import HubText
from tcd_ds.data.cache import build_once, cache_key
from tcd_ds.data.text import CorpusError, TextLines, corpus_name, expand_paths, fingerprint, no_text, sample_lines

SPECIAL_TOKENS = {
    "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"
}
# Ids 0..4 in this order; BERT-style models and the data pipeline rely on them.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
SPM_MODEL_FILE = "spm.model"
# Files a saved tokenizer is made from (transformers' names); a folder with none of them holds no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
SAMPLE_ABOVE_BYTES = 1 << 30  # reading every line of a bigger corpus into SentencePiece would take minutes


def build_tokenizer(
    train_paths: list[str],
    vocab_size: int,
    cache_dir: str,
    lowercase: bool = False,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    hub: HubText | None = None,
    cached_only: bool = False,
) -> PreTrainedTokenizerBase:
    """Train (or reuse from `cache_dir/tokenizers/<hash>`) a unigram tokenizer on the text files, or on `hub`.

    The hash covers the corpus content and every training option, so any change retrains. SentencePiece keeps
    at most `max_sentences` lines (sampled with `seed`); a corpus over SAMPLE_ABOVE_BYTES, or a hub dataset, is
    sampled before it reaches SentencePiece, so that training time is bounded too: runs of lines from seeded
    random offsets of the files, or the first lines of the hub stream shuffled with `seed`.
    `cached_only`: raise `NotCached` rather than train.
    """
    options = dict(vocab_size=vocab_size, lowercase=lowercase, max_sentences=max_sentences, seed=seed)
    if hub is None:
        files = expand_paths(train_paths)
        key = cache_key(corpus=fingerprint(files), sentencepiece=spm.__version__, **options)
        corpus = corpus_name(files)
        if sum(f.stat().st_size for f in files) > SAMPLE_ABOVE_BYTES:
            lines = lambda: sample_lines(files, max_sentences, seed)  # noqa: E731
        else:
            lines = lambda: TextLines(files)  # noqa: E731
    else:
        corpus = f"hub dataset {hub.name}"
        key = cache_key(corpus=hub.identity(cache_dir), sentencepiece=spm.__version__, **options)
        lines = lambda: itertools.islice(  # noqa: E731
            hub.lines(hub.rows().shuffle(seed=seed, buffer_size=10_000)), max_sentences
        )
    folder = build_once(
        Path(cache_dir) / "tokenizers" / key, lambda tmp: _train(lines(), corpus, tmp, **options), cached_only=cached_only
    )
    return load_tokenizer(folder)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer folder written by `build_tokenizer` (or any `save_pretrained` folder), offline; a ValueError
    naming the folder when it holds no tokenizer (transformers would blame a missing sentencepiece or tiktoken)."""
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); give a folder written "
                         "by a tokenizer's save_pretrained, e.g. a run dir's tokenizer/")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _train(text: Iterable[str], corpus: str, out: Path, vocab_size: int, lowercase: bool, max_sentences: int,
           seed: int) -> None:
    """`corpus`: the text's name in messages."""
    started = time.perf_counter()
    lines = iter(text)
    first = next(lines, None)
    if first is None:  # SentencePiece would fail on it with `!sentences_.empty()`
        raise no_text(text) if isinstance(text, TextLines) else CorpusError(f"{corpus}: no text to train on")
    spm.set_random_generator_seed(seed)
    model = out / SPM_MODEL_FILE
    with open(model, "wb") as writer, _too_little_text(corpus, vocab_size):
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_writer=writer,
            model_type="unigram",
            vocab_size=vocab_size,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1,
            pad_piece=SPECIAL_TOKENS["pad_token"], unk_piece=SPECIAL_TOKENS["unk_token"],
            control_symbols=[SPECIAL_TOKENS[k] for k in ("cls_token", "sep_token", "mask_token")],
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,  # wiki paragraphs exceed the 4 kB default
            num_threads=1,  # multi-threaded EM is not bit-reproducible
            minloglevel=2,
        )
    _to_hf(model.read_bytes()).save_pretrained(out)
    print(f"[tcd-ds] trained a {vocab_size}-piece tokenizer in {time.perf_counter() - started:.1f} s", flush=True)


@contextlib.contextmanager
def _too_little_text(corpus: str, vocab_size: int):
    """SentencePiece's refusal of a corpus with fewer distinct pieces than the vocabulary, as a CorpusError."""
    try:
        yield
    except RuntimeError as e:
        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
        if most is None:
            raise
        raise CorpusError(
            f"{corpus}: too little text for a vocabulary of {vocab_size} pieces "
            f"(data.tokenizer.vocab_size); it has at most {most.group(1)}"
        ) from None


def _to_hf(spm_model: bytes) -> PreTrainedTokenizerFast:
    """The same segmentation as SentencePiece (normaliser, whitespace handling, unigram scores) in `tokenizers`."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    tokenizer = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=UNK_ID, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Strip(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
