"""The KV cache of one rank, in slots, and the shapes of the windows the graphs see.

Each worker keeps `slots` sequences of up to `capacity` positions, allocated once
(numpy zeros: pages are committed as they are written, so an idle cache costs no
RSS). A sequence owns one slot from admission to retirement; the coordinator only
names slot ids. A graph call gets a *window*, the first `kv_len` positions of the
slots taking part, gathered into a contiguous array, and hands back only the K/V it
computed, which `write` puts into the slots. A step therefore copies and attends over
what the batch holds (`kv_len` = its longest sequence, rounded up), never the whole
capacity, and nothing is ever copied back.

Shape gears (each new input shape costs a compile, ~0.5 s on CPU; one GE gear per
shape on Ascend): the batch is padded up to the next batch gear, `kv_len` to a
multiple of `KV_ALIGN` (or the smallest bucket that holds it) and a prefill chunk to a
multiple of `SEQ_ALIGN` (or a bucket). Padded rows see an all-zero window and are
dropped from the results.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dsflow.common.errors import DsflowError

KV_ALIGN = 128
SEQ_ALIGN = 16


class CacheLimitError(DsflowError):
    """A request that can never fit the slot cache (prompt + max tokens > capacity)."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def gear(n: int, gears: Optional[Sequence[int]], align: int, what: str = "length") -> int:
    """n rounded up to the smallest gear that holds it, or to a multiple of `align`."""
    if not gears:
        return round_up(max(n, 1), align)
    for g in sorted(gears):
        if g >= n:
            return g
    raise CacheLimitError(f"{what} ({n}) fits no shape gear of these artifacts (largest "
                          f"{max(gears)}); rebuild with larger --buckets / --batch-sizes")


def batch_gears(max_batch: int) -> list[int]:
    """Powers of two below max_batch, and max_batch: few shapes, little padding."""
    gears, g = [], 1
    while g < max_batch:
        gears.append(g)
        g *= 2
    return gears + [max_batch]


def check_writes(slot_ids: np.ndarray, end: np.ndarray, slots: int, capacity: int) -> None:
    """Writes to `slot_ids` up to positions `end` must stay inside `slots` x `capacity`
    (both cache modes: the host slots here, the resident graphs' cache)."""
    if len(slot_ids) and (slot_ids.min() < 0 or slot_ids.max() >= slots):
        raise ValueError(f"slot ids {slot_ids.tolist()} outside 0..{slots - 1}")
    if len(end) and end.max() > capacity:
        raise ValueError(f"write up to position {int(end.max())} beyond the slot "
                         f"capacity {capacity}")


def check_distinct(slot_ids: np.ndarray) -> None:
    """A step's rows name distinct slots: the graphs that write the cache in place (the
    resident graphs' scatter, ONNX's in-place GroupQueryAttention) would have two rows
    write one slot."""
    ids = slot_ids.tolist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"slot ids {ids}: must be distinct")


class SlotCache:
    """K and V of `slots` sequences x `capacity` positions:
    [layers, slots, kv_heads_per_rank, capacity, head_dim] each."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int,
                 dtype=np.float32):
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.key = np.zeros(shape, dtype)
        self.value = np.zeros(shape, dtype)
        self.slots, self.capacity = slots, capacity
        # the last window buffers of each caller (prefill, decode): consecutive steps
        # mostly share a shape, and writing into fresh pages cost as much as the copy
        # itself (measured 2x slower at 8 rows x 128). One pair per caller bounds it.
        self._buffers: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    def check(self, slot_ids: np.ndarray, end: np.ndarray) -> None:
        check_writes(slot_ids, end, self.slots, self.capacity)

    def window(self, slot_ids: np.ndarray, kv_len: int, rows: int,
               caller: str = "") -> tuple[np.ndarray, np.ndarray]:
        """The first kv_len positions of the given slots, as [layers, rows, ...] arrays
        (rows beyond len(slot_ids) are zero: batch-gear padding). The arrays are
        reused by the caller's next window of the same shape: use them before asking
        for another."""
        kv_len = min(kv_len, self.capacity)
        shape = (self.key.shape[0], rows, self.key.shape[2], kv_len, self.key.shape[4])
        pair = self._buffers.get(caller)
        if pair is None or pair[0].shape != shape:
            self._buffers.pop(caller, None)  # free the old pair first
            pair = (np.empty(shape, self.key.dtype), np.empty(shape, self.key.dtype))
            self._buffers[caller] = pair
        for cache, win in zip((self.key, self.value), pair):
            # one copy per slot straight into the window (fancy indexing would copy the
            # whole window twice: measured 2x slower at 16 rows)
            for i, slot in enumerate(slot_ids.tolist()):
                win[:, i] = cache[:, slot, :, :kv_len]
            win[:, len(slot_ids):] = 0
        return pair

    def write(self, slot_ids: np.ndarray, start: np.ndarray, lengths: np.ndarray,
              key: np.ndarray, value: np.ndarray) -> None:
        """Store row i's first lengths[i] new positions at start[i].. of slot_ids[i]."""
        self.check(slot_ids, start + lengths)
        for i, (slot, s, n) in enumerate(zip(slot_ids.tolist(), start.tolist(),
                                             lengths.tolist())):
            self.key[:, slot, :, s:s + n] = key[:, i, :, :n]
            self.value[:, slot, :, s:s + n] = value[:, i, :, :n]

    def copy(self, src: int, dst: Sequence[int], length: int) -> None:
        """Slots `dst` get the first `length` positions of slot `src` (n samples of one
        prompt share its prefill)."""
        self.check(np.array([src, *dst]), np.array([length]))
        for d in dst:
            self.key[:, d, :, :length] = self.key[:, src, :, :length]
            self.value[:, d, :, :length] = self.value[:, src, :, :length]
