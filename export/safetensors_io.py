"""Safetensors read lazily through mmap, and written, with numpy only.

Why not the `safetensors` package: numpy has no bfloat16, so its numpy API cannot
return DeepSeek-Coder's bf16 tensors, and we want per-rank slices read straight from
the mapped file (only the pages a rank needs are touched) plus strict validation of
headers that lie about sizes. The format is an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
bf16 is returned as uint16 bit patterns (see `dtypes.to_numpy_dtype`).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .errors import CheckpointError

# safetensors dtype -> (numpy storage dtype, our dtype name)
ST_DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "F64": (np.float64, "float64"),
    "I64": (np.int64, "int64"),
    "I32": (np.int32, "int32"),
    "I16": (np.int16, "int16"),
    "I8": (np.int8, "int8"),
    "U8": (np.uint8, "uint8"),
    "BOOL": (np.bool_, "bool"),
}
ST_NAMES = {name: code for code, (_, name) in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: header parsed and checked at open, tensors mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        self.entries, self._data_start = self._read_header(size)
        self._mm = (mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
                    if size > 0 else None)

    def _read_header(self, size: int) -> tuple[dict, int]:
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated (only {size} bytes)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{self.path}: header length {n} exceeds the file "
                                  f"({size} bytes): truncated or not safetensors")
        try:
            header = json.loads(self._fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: header is not valid JSON") from None
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        for name, e in header.items():
            self._check_entry(name, e, data_len)
        return header, 8 + n

    def _check_entry(self, name: str, e: Mapping, data_len: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict) or e.get("dtype") not in ST_DTYPES:
            raise CheckpointError(f"{where}: unsupported or missing dtype "
                                  f"{e.get('dtype') if isinstance(e, dict) else e!r}")
        start, stop = e["data_offsets"]
        itemsize = np.dtype(ST_DTYPES[e["dtype"]][0]).itemsize
        expected = int(np.prod(e["shape"], dtype=np.int64)) * itemsize
        if stop - start != expected or start < 0:
            raise CheckpointError(f"{where}: header says {stop - start} bytes but shape "
                                  f"{e['shape']} {e['dtype']} needs {expected}")
        if stop > data_len:
            raise CheckpointError(f"{where}: data ends at byte {stop} but the file has only "
                                  f"{data_len} data bytes (truncated?)")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return ST_DTYPES[self.entries[name]["dtype"]][1]

    def array(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (no copy, nothing read yet)."""
        e = self.entries[name]
        np_dtype = ST_DTYPES[e["dtype"]][0]
        start, stop = e["data_offsets"]
        if stop == start:
            return np.zeros(e["shape"], np_dtype)
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=stop - start,
                            offset=self._data_start + start)
        return buf.view(np_dtype).reshape(e["shape"])

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map goes with it
                pass
        self._fh.close()


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray, str]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write (name, array, dtype name) triples; bf16 arrays are uint16 bit patterns.

    Streams tensor by tensor, so peak memory is one tensor, not the file."""
    items = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, arr, dtype in items:
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr, _ in items:
            f.write(np.ascontiguousarray(arr).data)
