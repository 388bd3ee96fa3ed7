"""PyTorch zip checkpoints (`pytorch_model*.bin`) read lazily, without torch and without
running any code from the pickle.

Why not `torch.load`: it needs torch, reads every tensor into memory, and (unless
weights_only) executes whatever the pickle asks for. A checkpoint downloaded from a hub
must not be able to run a command, so the pickle goes through `_StateDictUnpickler`,
whose `find_class` allows only the globals a plain state dict needs; anything else is
refused with a CheckpointError naming the file and the 'module.name'.

The format (torch >= 1.6 `torch.save`, which transformers' save_pretrained(
safe_serialization=False) used): a zip archive whose entries all sit under one folder
`<prefix>/` and are STORED (uncompressed) with data 64-byte aligned:

    <prefix>/data.pkl     the state dict, pickle protocol 2
    <prefix>/data/<key>   raw little-endian bytes of storage <key>
    <prefix>/byteorder    b'little' (absent in files older than torch 1.10: little)
    <prefix>/version, .format_version, .storage_alignment, .data/serialization_id

torch 2.13 pickles each tensor as
    torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                                    collections.OrderedDict())
with `storage` a persistent id ('storage', torch.<T>Storage, key, location, numel).
Those are the only globals it writes for a state dict (checked with pickletools.dis).
Tensors are rebuilt here as `_TensorRef` descriptors; `array` returns a numpy view into
an mmap of the whole file at the entry's data offset (from the zip local header).
bf16 is returned as uint16 bit patterns, like SafetensorsFile.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsflow.common.errors import CheckpointError
from dsflow.export.checkpoint.mapped_file import MappedFile, check_extent, itemsize

# torch legacy storage class -> our dtype name
TORCH_STORAGES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
ZIP_LOCAL_MAGIC = b"PK\x03\x04"
# Pre-1.6 torch.save wrote a bare pickle stream starting with this protocol-2 long.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass(frozen=True)
class _StorageType:
    """What `find_class` returns for torch.<T>Storage: a name, nothing callable."""
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int
    location: str


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride) -> _TensorRef:
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _TensorRef:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """An nn.Parameter in the dict is just its tensor to us."""
    return data


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in TORCH_STORAGES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Rebuilds a state dict of tensor descriptors; every other global is refused."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: data.pkl refers to '{module}.{name}', which a plain "
                "state dict never needs; refusing to load it (the file may be "
                "malicious, or not a weights-only checkpoint)") from None

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._path}: data.pkl has an unexpected persistent "
                                  f"id {pid!r} (expected a torch storage)")
        _, stype, key, location, numel = pid
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self._path}: storage {key!r} has a bad size {numel!r}")
        return _StorageRef(str(key), TORCH_STORAGES[stype.name], numel, str(location))


class TorchBinFile(MappedFile):
    """One PyTorch zip checkpoint: pickle checked at open, tensors mapped on demand."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        head = self._fh.read(len(LEGACY_MAGIC))
        if head == LEGACY_MAGIC:
            raise CheckpointError(f"{self.path}: legacy (pre-torch-1.6) serialization is "
                                  "not supported; re-save it with a newer torch or as "
                                  "safetensors")
        self._fh.seek(0)
        try:
            zf = zipfile.ZipFile(self._fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as e:
            raise CheckpointError(f"{self.path}: not a PyTorch zip checkpoint, or "
                                  f"truncated ({e})") from None
        with zf:
            infos = {i.filename: i for i in zf.infolist()}
            prefix = self._prefix(infos)
            self._check_byteorder(zf, infos, prefix)
            pkl = self._read_entry(infos[prefix + "data.pkl"], self.size)
            self.entries = self._unpickle(pkl)
            self._offsets = {}  # storage key -> (data offset, nbytes)
            for name, t in self.entries.items():
                self._locate(name, t, infos, prefix, self.size)

    def _prefix(self, infos: dict) -> str:
        pkls = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{self.path}: zip has {len(pkls)} '<prefix>/data.pkl' "
                                  "entries (expected 1): not a torch.save checkpoint")
        return pkls[0][: -len("data.pkl")]

    def _check_byteorder(self, zf: zipfile.ZipFile, infos: dict, prefix: str) -> None:
        info = infos.get(prefix + "byteorder")
        if info is not None and zf.read(info).strip() != b"little":
            raise CheckpointError(f"{self.path}: big-endian checkpoint is not supported")

    def _data_span(self, info: zipfile.ZipInfo, size: int, what: str) -> tuple[int, int]:
        """(offset, nbytes) of an entry's data, from its local header: torch stores
        entries uncompressed, so the bytes can be mapped in place."""
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise CheckpointError(f"{self.path}: {what}: zip entry {info.filename!r} is "
                                  "compressed or encrypted; torch writes them stored "
                                  "(re-save the checkpoint with torch.save)")
        h = info.header_offset
        if h + 30 > size or self._mm[h:h + 4] != ZIP_LOCAL_MAGIC:
            raise CheckpointError(f"{self.path}: {what}: zip local header of "
                                  f"{info.filename!r} is missing (corrupt or truncated)")
        n, m = struct.unpack("<HH", self._mm[h + 26:h + 30])
        start = h + 30 + n + m
        check_extent(f"{self.path}: {what}: zip entry {info.filename!r}",
                     start + info.file_size, size)
        return start, info.file_size

    def _read_entry(self, info: zipfile.ZipInfo, size: int) -> bytes:
        start, n = self._data_span(info, size, "data.pkl")
        return self._mm[start:start + n]

    def _unpickle(self, data: bytes) -> dict:
        try:
            obj = _StateDictUnpickler(data, self.path).load()
        except CheckpointError:
            raise
        except Exception as e:  # any malformed or hostile pickle
            raise CheckpointError(f"{self.path}: data.pkl is not a plain state dict "
                                  f"({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: data.pkl holds a {type(obj).__name__}, "
                                  "not a state dict")
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, _TensorRef):
                raise CheckpointError(f"{self.path}: entry {name!r} is a "
                                      f"{type(value).__name__}, not a tensor")
        return dict(obj)

    def _locate(self, name: str, t: _TensorRef, infos: dict, prefix: str,
                size: int) -> None:
        """Check the tensor fits its storage and the storage its zip entry."""
        where = f"{self.path}: tensor {name!r}"
        s = t.storage
        if not isinstance(s, _StorageRef):
            raise CheckpointError(f"{where}: storage is not a torch storage")
        if s.key not in self._offsets:
            info = infos.get(f"{prefix}data/{s.key}")
            if info is None:
                raise CheckpointError(f"{where}: storage entry '{prefix}data/{s.key}' is "
                                      "missing from the zip")
            start, nbytes = self._data_span(info, size, f"tensor {name!r}")
            need = s.numel * itemsize(s.dtype)
            if nbytes < need:
                raise CheckpointError(f"{where}: storage {s.key!r} has {nbytes} bytes, "
                                      f"its {s.numel} {s.dtype} elements need {need}")
            self._offsets[s.key] = (start, nbytes)
        ints = (t.offset, *t.size, *t.stride)
        if (not all(isinstance(v, int) and v >= 0 for v in ints)
                or len(t.size) != len(t.stride)):
            raise CheckpointError(f"{where}: bad offset/size/stride {t.offset}, "
                                  f"{list(t.size)}, {list(t.stride)}")
        if 0 not in t.size:
            last = t.offset + sum((n - 1) * st for n, st in zip(t.size, t.stride))
            if last >= s.numel:
                raise CheckpointError(f"{where}: shape {list(t.size)} stride "
                                      f"{list(t.stride)} at offset {t.offset} reaches element "
                                      f"{last}, but storage {s.key!r} has {s.numel}")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].size

    def dtype(self, name: str) -> str:
        return self.entries[name].storage.dtype

    def spans(self, name: str) -> list[tuple[int, int]] | None:
        t = self.entries[name]
        if 0 in t.size or t.stride != _contiguous_strides(t.size):
            return None
        start, _ = self._offsets[t.storage.key]
        item = itemsize(t.storage.dtype)
        return [(start + t.offset * item, int(np.prod(t.size, dtype=np.int64)) * item)]

    def array(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file; a non-contiguous tensor (a transposed
        or strided view saved as is) is copied into a contiguous array here, on demand."""
        t = self.entries[name]
        start, _ = self._offsets.get(t.storage.key, (0, 0))
        if 0 in t.size or t.stride == _contiguous_strides(t.size):
            return self.view(start + t.offset * itemsize(t.storage.dtype), t.storage.dtype,
                             t.size)
        flat = self.view(start, t.storage.dtype, (t.storage.numel,))
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.size, strides=[s * flat.itemsize for s in t.stride],
            writeable=False)
        return np.ascontiguousarray(view)


def _contiguous_strides(size: tuple) -> tuple:
    """Row-major strides in elements. Anything else (a transposed view, or a size-1
    dim with an odd stride) takes the copying path in `array`: correct, just slower."""
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))
