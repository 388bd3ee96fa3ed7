"""Applying the tensor-parallel plan to a checkpoint: one rank's tensors, streamed.

A rank's slice of a tensor is produced as consecutive chunks of its rows (about
CHUNK_BYTES each, C order), read with pread (`Checkpoint.read_rows`) into one of two
reused buffers. Converting, the NaN/Inf check and the writer's sha256 then run on a
chunk that is still in the CPU cache, and no fresh page is faulted in per tensor: on a
machine whose memory bandwidth is the limit (2-core VMs are), that is what brings
sharding near copy speed, and peak memory is a few chunks, not a tensor.

Every chunk is checked for NaN/Inf here, in the dtype it is delivered in, because this
is the one place each byte passes anyway: checking the whole checkpoint up front would
read it twice, and checking after conversion also catches values that overflow a
narrower dtype (fp32 -> fp16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from dsflow.graphs.tp_plan import WeightSpec, weight_specs
from dsflow.export.checkpoint.reader import Checkpoint
from dsflow.common.dtypes import convert
from dsflow.common.errors import CheckpointError
from dsflow.export.checkpoint.mapped_file import STORAGE_DTYPES, nbytes

CHUNK_BYTES = 8 << 20  # target bytes of one chunk of a rank slice
BF16_EXPONENT = 0x7F80  # all-ones exponent: Inf or NaN


class ChunkBuffers:
    """Two buffers used in turn, plus a scratch for row-split reads.

    Two suffice for the shard writer: its background thread holds at most one chunk
    in flight, and handing over chunk k+1 waits until chunk k is written, so the
    buffer of chunk k is free again when chunk k+2 needs it. Any other consumer must
    copy a chunk before asking for the next one."""

    def __init__(self) -> None:
        self._bufs = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        self._turn = 0
        self._scratch = np.empty(0, np.uint8)
        self.check = np.empty(0, np.uint16)  # for the bf16 finiteness check

    @staticmethod
    def _fit(buf: np.ndarray, size: int) -> np.ndarray:
        return buf if buf.size >= size else np.empty(size, np.uint8)

    def next(self, shape: tuple, np_dtype) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        self._turn ^= 1
        self._bufs[self._turn] = self._fit(self._bufs[self._turn], size)
        return self._bufs[self._turn][:size].view(np_dtype).reshape(shape)

    def scratch(self, shape: tuple, np_dtype) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        self._scratch = self._fit(self._scratch, size)
        return self._scratch[:size].view(np_dtype).reshape(shape)


def _rows_per_chunk(spec: WeightSpec, dtype: str) -> int:
    return max(1, CHUNK_BYTES // max(1, nbytes(spec.shape[1:], dtype)))


def slice_chunks(ckpt: Checkpoint, spec: WeightSpec, tp: int, rank: int,
                 bufs: ChunkBuffers) -> Iterator[np.ndarray]:
    """`rank`'s part of a tensor, in its storage dtype, as consecutive row chunks.

    Replicated and axis-0 splits are contiguous rows of the source, read straight
    into the chunk; an axis-1 (row-parallel) split reads whole source rows into the
    scratch and keeps its columns. Zero rows pad a vocabulary tp does not divide."""
    src = ckpt.dtype(spec.name)
    np_dtype = STORAGE_DTYPES[src]
    first, last, pad = (spec.rank_range(tp, rank) if spec.axis == 0
                        else (0, spec.shape[0], 0))
    step = _rows_per_chunk(spec, src)
    for i in range(first, last, step):
        j = min(i + step, last)
        if spec.axis == 1:
            a, b, _ = spec.rank_range(tp, rank)
            full = bufs.scratch((j - i, *spec.shape[1:]), np_dtype)
            ckpt.read_rows(spec.name, i, j, full)
            chunk = bufs.next((j - i, b - a), np_dtype)
            np.copyto(chunk, full[:, a:b])
        else:
            chunk = bufs.next((j - i, *spec.shape[1:]), np_dtype)
            ckpt.read_rows(spec.name, i, j, chunk)
        yield chunk
    if pad:
        yield np.zeros((pad, *spec.shape[1:]), np_dtype)


def all_finite(arr: np.ndarray, dtype: str, scratch: np.ndarray | None = None) -> bool:
    """No NaN or Inf in `arr` (dtype by name; bf16 as uint16 bit patterns)."""
    if dtype != "bfloat16":
        return bool(np.isfinite(arr).all())
    flat = arr.reshape(-1)
    if scratch is None or scratch.size < flat.size:
        scratch = np.empty(flat.size, np.uint16)
    bits = np.bitwise_and(flat, 0x7FFF, out=scratch[:flat.size])
    return bits.size == 0 or int(bits.max()) < BF16_EXPONENT


def check_finite(arr: np.ndarray, dtype: str, name: str, path: Path,
                 scratch: np.ndarray | None = None) -> np.ndarray:
    """`arr`, or a CheckpointError naming the file and tensor if it holds NaN/Inf."""
    if not all_finite(arr, dtype, scratch):
        raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf values"
                              f" (as {dtype})")
    return arr


def _checked(ckpt: Checkpoint, spec: WeightSpec, tp: int, rank: int, dtype: str,
             bufs: ChunkBuffers) -> Iterator[np.ndarray]:
    """The chunks of one rank slice, converted to `dtype` and checked."""
    for chunk in slice_chunks(ckpt, spec, tp, rank, bufs):
        with np.errstate(over="ignore"):  # an overflow is reported below, by name
            chunk = convert(chunk, ckpt.dtype(spec.name), dtype)
        if dtype == "bfloat16" and bufs.check.size < chunk.size:
            bufs.check = np.empty(chunk.size, np.uint16)
        yield check_finite(chunk, dtype, spec.name, ckpt.file_of(spec.name), bufs.check)


def rank_chunks(ckpt: Checkpoint, tp: int, rank: int,
                dtype: str) -> Iterator[tuple[str, Iterator[np.ndarray]]]:
    """(HF name, its chunks in `dtype`) for every weight of the plan; each chunk
    iterator must be used up before the next name is asked for (see ChunkBuffers)."""
    bufs = ChunkBuffers()
    for spec in weight_specs(ckpt.config):
        yield spec.name, _checked(ckpt, spec, tp, rank, dtype, bufs)


def rank_tensors(ckpt: Checkpoint, tp: int, rank: int,
                 dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, this rank's tensor in `dtype`) for every weight of the plan."""
    specs = {s.name: s for s in weight_specs(ckpt.config)}
    for name, chunks in rank_chunks(ckpt, tp, rank, dtype):
        out = np.empty(specs[name].rank_shape(tp), STORAGE_DTYPES[dtype])
        flat, pos = out.reshape(-1), 0
        for chunk in chunks:
            flat[pos:pos + chunk.size] = chunk.reshape(-1)
            pos += chunk.size
        yield name, out
