"""Plain-text corpora on disk: which files, their lines, and a content fingerprint for caches."""

import bisect
import functools
import hashlib
import itertools
import random
import os
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt",)


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, directories as their *.txt files (recursive, sorted), in argument order."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}")
            files += found
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return files


class TextLines:
    """Stripped non-empty lines of files; a line that is not valid UTF-8 is skipped and counted, not fatal.

    One bad byte in a multi-GB scrape should cost a line, not a run.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self.lines = 0
        self.skipped = 0
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        for file in self.files:
            with open(file, "rb") as f:
                for raw in f:
                    self.bytes_read += len(raw)
                    try:
                        line = raw.decode("utf-8").strip()
                    except UnicodeDecodeError:
                        self.skipped += 1
                        continue
                    if line:
                        self.lines += 1
                        yield line


class CorpusError(ValueError):
    """A corpus that cannot be trained on (no text, too little text): the user's data, not a bug; the message
    names its files, and the launcher prints it and exits 2."""


def corpus_name(files: list[Path]) -> str:
    shown = ", ".join(map(str, files[:3]))
    return shown + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def no_text(lines: TextLines) -> CorpusError:
    """The error for files read to their end without one text line."""
    why = (f"all {lines.skipped} of its non-empty lines are not UTF-8 (binary, or another encoding?)" if lines.skipped
           else "it is empty (or whitespace only)")
    return CorpusError(f"{corpus_name(lines.files)}: no text: {why}")


def check_corpus(field: str, paths: list[str | Path]) -> None:
    """A CorpusError naming `field` unless the corpus has a file and a text line. It reads up to the first text
    line, so it costs nothing on a real corpus: cheap enough to run before any launch."""
    try:
        lines = TextLines(expand_paths(paths))
        stream = iter(lines)
        found = next(stream, None) is not None
        stream.close()
    except OSError as e:  # no such file, no *.txt in a directory, permission denied
        raise CorpusError(f"{field}: {e}") from None
    if not found:
        raise CorpusError(f"{field}: {no_text(lines)}")


def fingerprint(files: list[Path]) -> str:
    """sha256 over names relative to the files' common folder and contents: a moved corpus keeps its caches.

    Remembered per process by (path, size, mtime): a launch looks the corpus up more than once."""
    stat = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(tuple(files), stat)


@functools.lru_cache(maxsize=16)
def _fingerprint(files: tuple[Path, ...], stat: tuple) -> str:
    root = os.path.commonpath([str(f.resolve().parent) for f in files])
    digest = hashlib.sha256()
    for file in files:
        name = os.path.relpath(file.resolve(), root).encode()
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def sample_lines(files: list[Path], max_lines: int, seed: int, window: int = 1000) -> Iterator[str]:
    """About `max_lines` stripped non-empty lines, in runs of `window` consecutive lines read from seeded random
    byte offsets of the corpus: time and memory bounded by `max_lines`, not by the corpus, and the same lines
    for the same files and seed. (A run starts at the line after its offset; runs never overlap.)"""
    sizes = [f.stat().st_size for f in files]
    starts = [0, *itertools.accumulate(sizes)]
    rng = random.Random(seed)
    offsets = sorted(rng.randrange(starts[-1]) for _ in range(-(-max_lines // window)))
    done = -1  # the corpus offset up to which lines have been read
    for offset in offsets:
        continued = offset <= done
        offset = max(offset, done)
        k = bisect.bisect_right(starts, offset) - 1
        if k >= len(files):
            continue
        with open(files[k], "rb") as f:
            f.seek(offset - starts[k])
            if offset > starts[k] and not continued:
                f.readline()  # the rest of a line entered in the middle
            taken = 0
            while taken < window:
                raw = f.readline()
                if not raw:
                    break
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    continue
                if line:
                    taken += 1
                    yield line
            done = starts[k] + f.tell()
