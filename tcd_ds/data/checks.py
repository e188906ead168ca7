"""The user's data files, checked before any process group starts: a launch that would fail on them in its
first minute (or worse, on every rank with a traceback) is refused by the launcher instead, exit status 2."""

from __future__ import annotations

from tcd_ds.data.text import CorpusError, check_corpus
from tcd_ds.spec import DataSpec, SpecError


def check_data_files(data: DataSpec) -> None:
    """A SpecError with one line per problem: a corpus with no text line, a tokenizer folder with no tokenizer.
    Reads each corpus up to its first text line only, so it is cheap on any real corpus."""
    problems = []
    corpora = {"data.validation": data.validation} if data.hub else {"data.train": data.train,
                                                                      "data.validation": data.validation}
    for field, paths in corpora.items():
        try:
            check_corpus(field, paths)
        except CorpusError as e:
            problems.append(str(e))
    if data.tokenizer.path:
        from tcd_ds.data.tokenizer import load_tokenizer

        try:
            load_tokenizer(data.tokenizer.path)
        except (OSError, ValueError) as e:
            problems.append(f"data.tokenizer.path: {e}")
    if problems:
        raise SpecError(problems)
