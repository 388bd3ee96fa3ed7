"""MindSpore `.ckpt` files read lazily and written, with numpy only.

Why not `mindspore.load_checkpoint`: it reads the whole file into memory, parses it
into protobuf objects (one more copy) and builds Parameters; we want a rank's slice
mapped straight from the file. The schema, from mindspore 2.10
`mindspore/train/checkpoint_pb2.py` (checkpoint.proto, proto2):

    message Checkpoint { repeated Value value = 1;
      message Value { required string tag = 1;
                      oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } } }
    message TensorProto { repeated int64 dims = 1;          // not packed: one varint each
                          required string tensor_type = 2;  // "Float32", "BFloat16", ...
                          required bytes tensor_content = 3; }
    message MapTensorProto { repeated TensorProto tensor = 1; }

How `save_checkpoint` (mindspore/train/serialization.py) lays it out:
- one serialized `Checkpoint` per tensor, concatenated (protobuf merges them);
- a tensor over SLICE_SIZE (512 MiB) is written as several consecutive Values with the
  same tag and full dims, each holding the next piece of the bytes; the loader joins
  consecutive same-tag pieces. Those tensors are copied on `array`, all others are
  views into the map;
- a scalar has no dims; strings from append_dict are tensor_type "str" holding numpy
  UTF-32 text with dims [0] (kept in `strings`, not listed as tensors);
- with crc_check=True the file ends in b"crc_num" + 10-byte big-endian CRC32 of the
  rest, which is not protobuf: it is stripped (and checked if asked);
- bf16 is tensor_type "BFloat16" with the raw 2-byte patterns (uint16 here).
Unknown fields inside a record are skipped, as protobuf would; any other top-level
field is refused (encrypted or foreign files fail there, with a clear error).
"""
from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from dsflow.common.atomic import AtomicFile, as_bytes
from dsflow.common.errors import CheckpointError, ExportError
from dsflow.export.checkpoint.mapped_file import STORAGE_DTYPES, MappedFile, check_nbytes, itemsize, nbytes

# MindSpore tensor_type -> our dtype name
MS_DTYPES = {
    "Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16",
    "Float64": "float64", "Int64": "int64", "Int32": "int32", "Int16": "int16",
    "Int8": "int8", "UInt64": "uint64", "UInt32": "uint32", "UInt16": "uint16",
    "UInt8": "uint8", "Bool": "bool",
}
MS_NAMES = {name: code for code, name in MS_DTYPES.items()}
CRC_TRAILER = b"crc_num"
CRC_TRAILER_LEN = len(CRC_TRAILER) + 10
# save_checkpoint's SLICE_SIZE (512 * 1024 KB): the piece size mindspore writes.
CHUNK_BYTES = 512 * 1024 * 1024
WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32 = 0, 1, 2, 5


class _Truncated(Exception):
    """A field runs past the end of its message; reported with the file and tag."""


@dataclass
class _Entry:
    tensor_type: str
    dims: tuple
    chunks: list = field(default_factory=list)  # (offset, nbytes) of each piece


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Truncated("varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Truncated("varint longer than 10 bytes")


def _fields(buf, pos: int, end: int):
    """Yield (field number, wire type, value, value end) of one message; a
    length-delimited value is its start offset (nothing is copied), a varint its int."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value, pos = _varint(buf, pos, end)
            yield num, wire, value, pos
            continue
        if wire == WIRE_LEN:
            n, pos = _varint(buf, pos, end)
            size = n
        elif wire == WIRE_FIXED64:
            size = 8
        elif wire == WIRE_FIXED32:
            size = 4
        else:
            raise _Truncated(f"unsupported wire type {wire} (field {num})")
        if pos + size > end:
            raise _Truncated(f"field {num} needs {size} bytes, {end - pos} left")
        yield num, wire, pos, pos + size
        pos += size


class MindSporeCkptFile(MappedFile):
    """One .ckpt file: protobuf framing parsed and checked at open, tensors mapped."""

    def __init__(self, path: str | Path, check_crc: bool = False):
        super().__init__(path)
        self.entries: dict[str, _Entry] = {}
        self.strings: dict[str, str] = {}
        try:
            self._parse(self._strip_crc(self.size, check_crc))
            for tag, e in self.entries.items():
                self._check_entry(tag, e)
        except BaseException:
            self.close()
            raise

    def _strip_crc(self, size: int, check: bool) -> int:
        """End of the protobuf data: mindspore appends b'crc_num' + CRC32 (10 bytes)."""
        if size < CRC_TRAILER_LEN or self._mm[size - CRC_TRAILER_LEN:size - 10] != CRC_TRAILER:
            if check:
                raise CheckpointError(f"{self.path}: no CRC trailer to check "
                                      "(saved without crc_check=True)")
            return size
        end = size - CRC_TRAILER_LEN
        if check:
            crc, step = 0, 64 << 20
            for i in range(0, end, step):
                crc = binascii.crc32(self._mm[i:min(i + step, end)], crc)
            if crc != int.from_bytes(self._mm[size - 10:size], "big"):
                raise CheckpointError(f"{self.path}: CRC check failed (corrupt file)")
        return end

    def _parse(self, end: int) -> None:
        if end == 0:
            raise CheckpointError(f"{self.path}: empty file, not a MindSpore checkpoint")
        pos, prev = 0, None
        while pos < end:
            try:
                key, pos = _varint(self._mm, pos, end)
                n, pos = _varint(self._mm, pos, end) if key & 7 == WIRE_LEN else (0, pos)
            except _Truncated:
                raise CheckpointError(f"{self.path}: truncated after tensor {prev!r}") from None
            if key != (1 << 3 | WIRE_LEN):
                raise CheckpointError(f"{self.path}: unexpected field {key >> 3} (wire type "
                                      f"{key & 7}) after tensor {prev!r}: not a MindSpore "
                                      "checkpoint, or encrypted")
            if pos + n > end:
                raise CheckpointError(f"{self.path}: {self._name_at(pos, end, prev)} is cut "
                                      f"off: its record needs {n} bytes, the file has "
                                      f"{end - pos} left (truncated)")
            prev = self._parse_value(pos, pos + n, prev)
            pos += n
        if not self.entries and not self.strings:
            raise CheckpointError(f"{self.path}: no tensors found: not a MindSpore checkpoint")

    def _name_at(self, pos: int, end: int, prev: str | None) -> str:
        """The tensor a cut-off record belongs to, for the error message."""
        try:
            for num, wire, a, b in _fields(self._mm, pos, end):
                if num == 1 and wire == WIRE_LEN:
                    return f"tensor {self._text(a, b, 'tag')!r}"
                break
        except _Truncated:
            pass
        return f"the record after tensor {prev!r}"

    def _parse_value(self, start: int, stop: int, prev: str | None) -> str:
        """One Checkpoint.Value: record where its tensor bytes are, or join it to the
        previous piece of the same tensor. Returns its tag."""
        tag, tensor = None, None
        try:
            for num, wire, a, b in _fields(self._mm, start, stop):
                if num == 1 and wire == WIRE_LEN:
                    tag = self._text(a, b, "tag")
                elif num == 2 and wire == WIRE_LEN:
                    tensor = (a, b)
                elif num == 3:
                    raise CheckpointError(f"{self.path}: tensor {tag!r} is a MapParameter "
                                          "(maptensor), which dsflow does not read")
            if tag is None or tensor is None:
                raise _Truncated("record has no tag or no tensor")
            self._parse_tensor(tag, *tensor, continues=(tag == prev))
        except _Truncated as e:
            what = f"tensor {tag!r}" if tag is not None else f"the record after {prev!r}"
            raise CheckpointError(f"{self.path}: {what} is corrupt ({e}): not a MindSpore "
                                  "checkpoint, or encrypted") from None
        return tag

    def _parse_tensor(self, tag: str, start: int, stop: int, continues: bool) -> None:
        dims, ttype, content = [], None, None
        for num, wire, a, b in _fields(self._mm, start, stop):
            if num == 1 and wire == WIRE_VARINT:
                dims.append(a)
            elif num == 1 and wire == WIRE_LEN:  # packed, should a writer choose it
                pos = a
                while pos < b:
                    d, pos = _varint(self._mm, pos, b)
                    dims.append(d)
            elif num == 2 and wire == WIRE_LEN:
                ttype = self._text(a, b, f"tensor {tag!r} type")
            elif num == 3 and wire == WIRE_LEN:
                content = (a, b - a)
        where = f"{self.path}: tensor {tag!r}"
        if ttype is None or content is None:
            raise CheckpointError(f"{where}: record has no tensor_type or no content")
        if any(d >= 1 << 63 for d in dims):
            raise CheckpointError(f"{where}: negative dimension in {dims}")
        if ttype == "str":
            self.strings[tag] = bytes(self._mm[content[0]:content[0] + content[1]]
                                      ).decode("utf-32-le", "replace").rstrip("\0")
            return
        if ttype not in MS_DTYPES:
            raise CheckpointError(f"{where}: unsupported tensor_type {ttype!r}")
        if continues and tag in self.entries:
            e = self.entries[tag]
            if (e.tensor_type, e.dims) != (ttype, tuple(dims)):
                raise CheckpointError(f"{where}: pieces disagree on type/shape "
                                      f"({e.tensor_type} {list(e.dims)} vs {ttype} {dims})")
            e.chunks.append(content)
            return
        if tag in self.entries or tag in self.strings:
            raise CheckpointError(f"{where}: appears twice in the file")
        self.entries[tag] = _Entry(ttype, tuple(dims), [content])

    def _text(self, a: int, b: int, what: str) -> str:
        try:
            return bytes(self._mm[a:b]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Truncated(f"{what} is not UTF-8") from None

    def _check_entry(self, tag: str, e: _Entry) -> None:
        got = sum(n for _, n in e.chunks)
        if e.dims == (0,) and got == itemsize(self.dtype(tag)):
            e.dims = ()  # how mindspore marks a scalar
        check_nbytes(f"{self.path}: tensor {tag!r}", got, e.dims, e.tensor_type,
                     nbytes(e.dims, self.dtype(tag)))

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].dims

    def dtype(self, name: str) -> str:
        return MS_DTYPES[self.entries[name].tensor_type]

    def spans(self, name: str) -> list[tuple[int, int]]:
        return list(self.entries[name].chunks)

    def array(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file; a tensor mindspore split into pieces
        (over 512 MiB) is joined into a fresh array here."""
        e = self.entries[name]
        if len(e.chunks) == 1:
            return self.view(e.chunks[0][0], self.dtype(name), e.dims)
        out = np.empty(sum(n for _, n in e.chunks), np.uint8)
        pos = 0
        for offset, n in e.chunks:
            out[pos:pos + n] = self.view(offset, "uint8", (n,))
            pos += n
        return out.view(STORAGE_DTYPES[self.dtype(name)]).reshape(e.dims)


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload_len: int) -> bytes:
    """Key and length of a length-delimited field; the payload follows."""
    return _enc_varint(num << 3 | WIRE_LEN) + _enc_varint(payload_len)


def _record_head(name: str, dims: tuple, ms_type: str, size: int) -> bytes:
    """Everything of one Checkpoint.value record up to the tensor's `size` bytes."""
    tensor_head = b"".join(_enc_varint(1 << 3 | WIRE_VARINT) + _enc_varint(d) for d in dims)
    tensor_head += _len_field(2, len(ms_type)) + ms_type.encode()
    tensor_head += _len_field(3, size)
    tag = name.encode()
    value = _len_field(1, len(tag)) + tag + _len_field(2, len(tensor_head) + size)
    value_len = len(value) + len(tensor_head) + size
    return _len_field(1, value_len) + value + tensor_head


def write_mindspore_ckpt(path: str | Path, items: Iterable[tuple[str, np.ndarray, str]],
                         chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write (name, array, dtype name) triples as a .ckpt mindspore.load_checkpoint reads;
    bf16 arrays are uint16 bit patterns.

    Streams one tensor at a time (peak memory is one tensor) and, like save_checkpoint,
    splits a tensor into `chunk_bytes` pieces, so no protobuf field nears 2 GiB. Written
    to a temporary name and renamed (`atomic.AtomicFile`), so a crash never leaves a
    half file under `path`."""
    path = Path(path)
    seen: set[str] = set()
    with AtomicFile(path) as f:
        for name, arr, dtype in items:
            if dtype not in MS_NAMES:
                raise ExportError(f"{path}: tensor {name!r}: dtype {dtype!r} cannot be "
                                  f"written to a MindSpore checkpoint")
            storage = STORAGE_DTYPES[dtype]
            if arr.dtype != storage:
                raise ExportError(f"{path}: tensor {name!r} is {arr.dtype}, but {dtype} is "
                                  f"stored as {np.dtype(storage)}")
            if name in seen:
                raise ExportError(f"{path}: tensor {name!r} given twice")
            seen.add(name)
            data = as_bytes(arr)
            pieces = range(0, len(data), chunk_bytes) if len(data) else [0]
            for i in pieces:
                piece = data[i:i + chunk_bytes]
                f.write(_record_head(name, arr.shape, MS_NAMES[dtype], len(piece)))
                f.write(piece)
