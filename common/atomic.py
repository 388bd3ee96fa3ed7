"""Output files that appear under their final name only when complete.

Every file dsflow writes from weights goes through `AtomicFile`: bytes go to
`<name>.tmp-<pid>` beside the target, are fsynced, and the file is renamed into place
only when the writer commits. An interrupted or failed run therefore never leaves a
file that looks finished; a killed run leaves `*.tmp-<pid>` files that the next run
(`remove_stale_temps`) deletes. The sha256 is computed while writing (hashlib releases
the GIL), so checksumming a 66 GB output costs no second read.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from dsflow.common.errors import ExportError

_TEMP = re.compile(r"\.tmp-\d+$")


def temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def as_bytes(arr: np.ndarray) -> memoryview:
    """The array's bytes as a flat memoryview, without a copy when it is contiguous."""
    return memoryview(np.ascontiguousarray(arr)).cast("B")


class AtomicFile:
    """A binary file written under a temporary name and renamed by `commit`.

    Used as a context manager: leaving the block by an exception removes the
    temporary file; leaving it normally commits (if `commit` was not called).

    `background=True` hashes and writes from a thread: `write` hands the buffer over
    and returns at once (after waiting for the previous buffer to be written), so
    preparing the next buffer overlaps hashing and writing this one, on two cores.
    One buffer is in flight at a time; the caller must not modify a buffer until its
    next `write` has returned."""

    def __init__(self, path: str | Path, checksum: bool = False, background: bool = False):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.bytes = 0
        self._sha = hashlib.sha256() if checksum else None
        try:
            self._f = open(self.tmp, "wb")
        except OSError as e:
            raise ExportError(f"{self.path}: cannot write ({e.strerror})") from None
        self._done = False
        self._writer = (_BackgroundWriter(self._f, self.path, self._sha) if background
                        else None)

    def write(self, data) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        if self._writer is not None:
            self._writer.put(view)
        else:
            _digest_and_write(self._f, view, self.path, self._sha)
        self.bytes += view.nbytes

    @property
    def sha256(self) -> str:
        if self._sha is None:
            raise ValueError("AtomicFile was opened without checksum=True")
        return self._sha.hexdigest()

    def commit(self) -> None:
        """Flush to disk, then give the file its final name."""
        if self._done:
            return
        try:
            if self._writer is not None:
                self._writer.finish()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise ExportError(f"{self.path}: cannot finish writing ({e.strerror})") from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        self._done = True
        if self._writer is not None:
            self._writer.stop()
        self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.commit()


def _digest_and_write(f, view: memoryview, path: Path, sha) -> None:
    if sha is not None:
        sha.update(view)
    try:
        f.write(view)
    except OSError as e:
        raise ExportError(f"{path}: write failed ({e.strerror})") from None


class _BackgroundWriter:
    """A one-worker executor writing handed-over buffers in order; at most one buffer is
    in flight, and a write error surfaces on the next `put` or on `finish`."""

    def __init__(self, f, path: Path, sha):
        self._f, self._path, self._sha = f, path, sha
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsflow-writer")
        self._pending: Future | None = None

    def _write(self, view: memoryview) -> None:
        _digest_and_write(self._f, view, self._path, self._sha)
        self._start_writeback()

    def _start_writeback(self) -> None:
        """Have the kernel write what we wrote so far now, not all at the final fsync:
        the disk then works while the next buffers are prepared, and written pages
        leave the page cache instead of crowding out the checkpoint being read."""
        if hasattr(os, "posix_fadvise"):
            self._f.flush()
            try:
                os.posix_fadvise(self._f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only; some filesystems do not take it
                pass

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises the writer's error here

    def put(self, view: memoryview) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, view)

    def finish(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def stop(self) -> None:
        try:
            self._wait()
        except BaseException:  # aborting anyway: the error is moot
            pass
        self._pool.shutdown(wait=True)


def write_text_atomic(path: Path, text: str) -> None:
    with AtomicFile(path) as f:
        f.write(text.encode("utf-8"))


def remove_stale_temps(directory: Path) -> None:
    """Delete `*.tmp-<pid>` files an interrupted run left behind."""
    for p in directory.iterdir():
        if p.is_file() and _TEMP.search(p.name):
            p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Delete `.<name>.tmp-<pid>-*` staging directories of `out` whose process is gone
    (a build killed with SIGKILL cannot clean up after itself)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(\d+)-")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def make_staging_dir(out: Path, option: str = "--out") -> Path:
    """A fresh staging directory beside `out`, named after this process so that the
    next run can tell a dead run's leftovers from a live one's."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"{option} {out}: cannot write in {out.parent} "
                          f"({e.strerror})") from None


@contextmanager
def staged_directory(out: Path, option: str = "--out") -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds and
    removed when it fails. `out` must not exist or be empty: a finished directory of
    someone else's (an original checkpoint, say) is never replaced."""
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{option} {out}: exists and is not an empty directory; "
                          f"refusing to overwrite it (choose another {option})")
    tmp = make_staging_dir(out, option)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
