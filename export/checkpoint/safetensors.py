"""Safetensors read lazily through mmap, and written as a stream, with numpy only.

Why not the `safetensors` package: numpy has no bfloat16, so its numpy API cannot
return DeepSeek-Coder's bf16 tensors, and we want per-rank slices read straight from
the mapped file (only the pages a rank needs are touched) plus strict validation of
headers that lie about sizes. The format is an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
bf16 is returned as uint16 bit patterns (see `mapped_file.STORAGE_DTYPES`).

Writing streams too: the header depends only on names, shapes and dtypes, which the
tensor-parallel plan knows before any data is read, so `SafetensorsWriter` writes it
first and then one tensor at a time.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from dsflow.common.atomic import AtomicFile, as_bytes
from dsflow.common.errors import CheckpointError, ExportError
from dsflow.export.checkpoint.mapped_file import STORAGE_DTYPES, MappedFile, check_extent, check_nbytes, nbytes

# safetensors dtype code -> our dtype name
ST_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
ST_NAMES = {name: code for code, name in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024

# (name, shape, dtype name) of one tensor of a file to write
Layout = Sequence[tuple[str, tuple[int, ...], str]]


class SafetensorsFile(MappedFile):
    """One .safetensors file: header parsed and checked at open, tensors mapped on demand."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        try:
            self.entries, self._data_start = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> tuple[dict, int]:
        if self.size < 8:
            raise CheckpointError(f"{self.path}: truncated (only {self.size} bytes)")
        (n,) = struct.unpack("<Q", self._mm[:8])
        if n > MAX_HEADER or 8 + n > self.size:
            raise CheckpointError(f"{self.path}: header length {n} exceeds the file "
                                  f"({self.size} bytes): truncated or not safetensors")
        try:
            header = json.loads(self._mm[8:8 + n])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: header is not valid JSON") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_len = self.size - 8 - n
        for name, e in header.items():
            self._check_entry(name, e, data_len)
        return header, 8 + n

    def _check_entry(self, name: str, e: Mapping, data_len: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict) or e.get("dtype") not in ST_DTYPES:
            raise CheckpointError(f"{where}: unsupported or missing dtype "
                                  f"{e.get('dtype') if isinstance(e, dict) else e!r}")
        try:
            start, stop = (int(x) for x in e["data_offsets"])
            shape = [int(d) for d in e["shape"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: header entry needs 'shape' and two "
                                  "'data_offsets'") from None
        if start < 0 or min(shape, default=0) < 0:
            raise CheckpointError(f"{where}: negative offset or dimension in the header")
        check_nbytes(where, stop - start, shape, e["dtype"],
                     nbytes(shape, ST_DTYPES[e["dtype"]]))
        check_extent(where, stop, data_len)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return ST_DTYPES[self.entries[name]["dtype"]]

    def spans(self, name: str) -> list[tuple[int, int]]:
        start, stop = self.entries[name]["data_offsets"]
        return [(self._data_start + start, stop - start)]

    def array(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (no copy, nothing read yet)."""
        e = self.entries[name]
        return self.view(self._data_start + e["data_offsets"][0], self.dtype(name),
                         e["shape"])


def _header(layout: Layout, metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in layout:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # data starts 8-byte aligned


class SafetensorsWriter:
    """Streams tensors, in `layout` order, into a file whose header is written first.

    Atomic (see `atomic.AtomicFile`): the file gets its name only when every tensor of
    the layout has been written; `checksum=True` computes its sha256 on the way.
    Writing happens on a background thread with one buffer in flight: a written array
    must not be modified until the next `write`/`write_chunks` call has handed over
    another (shard.ChunkBuffers relies on exactly that)."""

    def __init__(self, path: str | Path, layout: Layout,
                 metadata: Mapping[str, str] | None = None, checksum: bool = False):
        self.layout = list(layout)
        self._next = 0
        self.file = AtomicFile(path, checksum=checksum, background=True)
        blob = _header(self.layout, metadata)
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, arr: np.ndarray) -> None:
        want, shape, dtype = self._expect(name)
        if tuple(arr.shape) != tuple(shape):
            raise ExportError(f"{self.file.path}: tensor {name!r} has shape "
                              f"{list(arr.shape)}, the layout says {list(shape)}")
        self.write_chunks(name, [arr])

    def write_chunks(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Tensor `name` as consecutive pieces of its C-order data (rows, say)."""
        want, shape, dtype = self._expect(name)
        storage, size = np.dtype(STORAGE_DTYPES[dtype]), nbytes(shape, dtype)
        written = 0
        for chunk in chunks:
            if chunk.dtype != storage:
                raise ExportError(f"{self.file.path}: tensor {name!r} is {chunk.dtype}, "
                                  f"the layout says {dtype}")
            self.file.write(as_bytes(chunk))
            written += chunk.nbytes
        if written != size:
            raise ExportError(f"{self.file.path}: tensor {name!r}: {written} bytes given, "
                              f"shape {list(shape)} {dtype} needs {size}")
        self._next += 1

    def _expect(self, name: str) -> tuple:
        if self._next >= len(self.layout) or self.layout[self._next][0] != name:
            expected = (self.layout[self._next][0] if self._next < len(self.layout)
                        else "no more tensors")
            raise ExportError(f"{self.file.path}: got tensor {name!r}, the layout expects "
                              f"{expected!r} next")
        return self.layout[self._next]

    def commit(self) -> None:
        if self._next != len(self.layout):
            raise ExportError(f"{self.file.path}: only {self._next} of "
                              f"{len(self.layout)} tensors written")
        self.file.commit()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is not None:
            self.file.abort()
        else:
            self.commit()


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray, str]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write (name, array, dtype name) triples; bf16 arrays are uint16 bit patterns.

    Holds every given array (the header needs all shapes first); to stream a
    checkpoint tensor by tensor, use `SafetensorsWriter` with a layout."""
    items = list(tensors)
    with SafetensorsWriter(path, [(n, tuple(a.shape), d) for n, a, d in items],
                           metadata) as w:
        for name, arr, _ in items:
            w.write(name, arr)
