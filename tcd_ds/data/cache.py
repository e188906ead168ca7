"""Content-addressed cache folders, built by one process at a time across every node that shares them."""

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".build.lock"
HEARTBEAT_S = 10.0  # the holder touches its lock this often
STALE_AFTER_S = 120.0  # a lock untouched this long is a dead holder's (on another node: no pid to ask)
WAIT_REPORT_S = 30.0  # a waiter says it is waiting this often


def cache_key(**parts: object) -> str:
    """A short stable hash of JSON-serialisable parts: what the cached thing was built from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class NotCached(LookupError):
    """A cache entry asked for with `cached_only` has not been built."""


def build_once(final: Path, build: Callable[[Path], None], cached_only: bool = False) -> Path:
    """Return `final`, building it first if absent (`cached_only`: raise `NotCached` instead).

    `build` fills a private temporary folder that is then renamed into place: a rename is atomic, so a
    reader never sees a half-written cache (a build killed half-way leaves only a `.name.tmp-*` folder, which
    the next build on that host deletes), and if two builders ever race the first rename wins and the other
    discards its (identical) copy.
    """
    if final.is_dir():
        return final
    if cached_only:
        raise NotCached(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(final)
    prefix = f".{final.name}.tmp-{os.getpid()}-{socket.gethostname()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
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


def _remove_dead_builds(final: Path) -> None:
    """Temporary folders of builds of `final` by processes of this host that no longer exist (killed)."""
    prefix = f".{final.name}.tmp-"
    for tmp in final.parent.glob(prefix + "*"):
        pid, _, rest = tmp.name[len(prefix):].partition("-")
        host = rest.rpartition("-")[0]
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def cache_lock(cache_dir: str | Path, what: str = "the data cache"):
    """Hold `cache_dir/.build.lock`, waiting (and saying so) while another process, on any node, holds it.

    The lock is a file created with O_CREAT|O_EXCL, which is atomic on local file systems and on NFSv3+/Lustre/
    GPFS, unlike fcntl/flock locks that some network file systems ignore. It names its holder (host, pid); the
    holder touches it every HEARTBEAT_S. A waiter breaks it when the holder is a dead process on its own host,
    or when it is untouched for STALE_AFTER_S (a holder on another node that died). Breaking has a narrow race
    in which two processes may both build; that costs time, never correctness: `build_once` renames atomically.
    """
    lock = Path(cache_dir) / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    waited_since, last_report = None, 0.0
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _stale_holder(lock)
            if holder is not None:
                _break(lock, holder)
                continue
            now = time.monotonic()
            waited_since = waited_since or now
            if now - last_report >= WAIT_REPORT_S:
                print(f"[tcd-ds] waiting for {_read(lock) or 'another process'} to finish building {what} "
                      f"({lock}; {now - waited_since:.0f} s so far)", file=sys.stderr, flush=True)
                last_report = now
            time.sleep(0.5)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _read(lock) == me:
            lock.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(lock)
        except OSError:
            pass


def _read(lock: Path) -> str | None:
    try:
        return lock.read_text().strip()
    except OSError:
        return None


def _stale_holder(lock: Path) -> str | None:
    """The lock's content if its holder is gone, else None."""
    holder = _read(lock)
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if holder is None or not holder:  # being written right now, or left empty by a kill at creation
        return "" if age > STALE_AFTER_S else None
    host, _, pid = holder.partition(" ")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return holder
    return holder if age > STALE_AFTER_S else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _break(lock: Path, holder: str) -> None:
    """Move the stale lock aside (atomic: of several breakers one wins), then delete it."""
    aside = lock.with_name(f"{lock.name}.stale.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    print(f"[tcd-ds] removed a stale build lock left by {holder or 'a killed process'} ({lock})",
          file=sys.stderr, flush=True)
    aside.unlink(missing_ok=True)
