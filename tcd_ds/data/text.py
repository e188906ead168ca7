"""Plain-text corpora on disk: which files, their lines, and a content fingerprint for caches."""

import hashlib
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

    def __iter__(self) -> Iterator[str]:
        for file in self.files:
            with open(file, "rb") as f:
                for raw in f:
                    try:
                        line = raw.decode("utf-8").strip()
                    except UnicodeDecodeError:
                        self.skipped += 1
                        continue
                    if line:
                        self.lines += 1
                        yield line


def fingerprint(files: list[Path]) -> str:
    """sha256 over names relative to the files' common folder and contents: a moved corpus keeps its caches."""
    root = os.path.commonpath([str(f.resolve().parent) for f in files])
    digest = hashlib.sha256()
    for file in files:
        name = os.path.relpath(file.resolve(), root).encode()
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
