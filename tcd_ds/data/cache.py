"""Content-addressed cache folders that several ranks may build at the same time."""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_key(**parts: object) -> str:
    """A short stable hash of JSON-serialisable parts: what the cached thing was built from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first if absent.

    `build` fills a private temporary folder that is then renamed into place: a rename is atomic, so a
    reader never sees a half-written cache, and when ranks race the first rename wins and the others
    discard their (identical) copies.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
