"""What every lazily read weights format shares: an open file, one read-only memory map
of it, numpy views into that map, and the size arithmetic their validation needs.

Why one base class: safetensors, PyTorch zip .bin and MindSpore .ckpt differ only in
how they say where a tensor's bytes are. Opening (with an error naming the file),
mapping, viewing, dropping mapped pages and closing are the same for all three, and
so is the dtype table (numpy has no bfloat16: bf16 travels as uint16 bit patterns).
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dsflow.common.dtypes import STORAGE
from dsflow.common.errors import CheckpointError

# Every dtype any format may hold: our name -> numpy storage dtype. The float ones
# come from dtypes.STORAGE (bf16 as uint16); integers and bool only appear in
# bookkeeping entries, never in DeepSeek-Coder weights.
STORAGE_DTYPES: dict[str, type] = {
    **STORAGE,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def itemsize(dtype: str) -> int:
    return np.dtype(STORAGE_DTYPES[dtype]).itemsize


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes a dense tensor of `shape` and dtype name `dtype` occupies."""
    return int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)


class MappedFile:
    """A weights file opened read-only and mapped whole; subclasses parse the framing.

    Views into the map cost no memory until touched; `release` drops the touched
    pages from this process's resident set once a tensor has been copied out (the
    page cache keeps them, so reading them again is cheap), which keeps the RSS of
    a pass over a 66 GB checkpoint at one tensor, not at the file size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        self.size = os.fstat(self._fh.fileno()).st_size
        self._mm: mmap.mmap | None = None
        if self.size > 0:
            try:
                self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                self._fh.close()
                raise CheckpointError(f"{self.path}: cannot map the file ({e})") from None

    def view(self, offset: int, dtype: str, shape: Sequence[int]) -> np.ndarray:
        """A read-only array over the file's bytes at `offset` (nothing is read yet)."""
        np_dtype = STORAGE_DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(tuple(shape), np_dtype)
        return np.frombuffer(self._mm, dtype=np_dtype, count=count,
                             offset=offset).reshape(tuple(shape))

    def spans(self, name: str) -> Optional[list[tuple[int, int]]]:
        """(file offset, bytes) pieces that hold tensor `name`'s row-major bytes in
        order, or None when they are not laid out that way (a strided view)."""
        return None

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows start..stop (axis 0) of tensor `name` into the C-contiguous `out`.

        With pread, straight from the page cache into `out`: nothing of the map
        becomes resident and no page faults are taken, which is what makes a pass
        over a large checkpoint run near copy speed."""
        spans = self.spans(name)
        if spans is None:
            out[...] = self.array(name)[start:stop]
            return
        row = nbytes(self.shape(name)[1:], self.dtype(name))
        self._pread(spans, start * row, memoryview(out).cast("B"), name)

    def _pread(self, spans: list[tuple[int, int]], pos: int, buf: memoryview,
               name: str) -> None:
        """Fill `buf` from byte `pos` of the stream the spans make up."""
        done = 0
        for offset, size in spans:
            if pos >= size:
                pos -= size
                continue
            while pos < size and done < len(buf):
                want = min(size - pos, len(buf) - done, 1 << 30)
                got = os.preadv(self._fh.fileno(), [buf[done:done + want]], offset + pos)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: tensor {name!r}: file ended while "
                                          "reading it (truncated while in use?)")
                done, pos = done + got, pos + got
            pos = 0
            if done == len(buf):
                return
        if done != len(buf):
            raise CheckpointError(f"{self.path}: tensor {name!r}: rows out of range")

    def release(self) -> None:
        """Drop this file's mapped pages from the resident set; views stay valid."""
        if self._mm is not None and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map goes with it
                pass
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_nbytes(where: str, got: int, shape: Sequence[int], dtype_label: str,
                 need: int) -> None:
    """A header whose byte count disagrees with its own shape and dtype is lying."""
    if got != need:
        raise CheckpointError(f"{where}: {got} bytes of data but shape {list(shape)} "
                              f"{dtype_label} needs {need} (corrupt or truncated?)")


def check_extent(where: str, end: int, available: int) -> None:
    """Data said to end beyond the file means the file was cut short."""
    if end > available:
        raise CheckpointError(f"{where}: data ends at byte {end} but the file has only "
                              f"{available} (truncated?)")
