"""What every worker backend shares: the slot cache and the window plumbing.

A backend subclass only knows how to run one of its graphs on numpy inputs
(`_run(kind, inputs) -> (logits, key, value)`); this class turns the worker protocol's
requests (slot ids, tokens, positions, kv_len) into graph inputs: batch padded to a
gear, a window gathered from the slots, and the returned K/V written back.

Artifacts built with the resident cache mode (graphs/signatures.py) take the whole
cache instead and return it updated: the batch is padded the same way, but padding
rows get slots no real row uses and write nothing (valid_length 0, position -1;
graphs/model.py SlotWriter), and `kv_len` is not used (the graphs attend over the
capacity, masked per row). Here the two cache tensors are host arrays: each step's
output pair becomes the next step's input pair (MindSpore's GraphCell allocates its
outputs, so the "other buffer" of the ping-pong is the one it returns); the Lite
backend overrides `_allocate_resident` / `_run_resident` to keep both pairs on the
device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dsflow.artifacts.manifest import Manifest
from dsflow.graphs.signatures import RESIDENT
from dsflow.runtime.backends.base import RankBackend
from dsflow.runtime.slot_cache import (SlotCache, batch_gears, check_distinct, check_writes,
                                       gear)

PAD_POSITION = -1  # a resident decode row that writes nothing (graphs/model.py)


def pad_rows(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """`a` with its first axis padded to `rows` (batch gear), contiguous int32."""
    a = np.ascontiguousarray(a, dtype=np.int32)
    if a.shape[0] == rows:
        return a
    out = np.full((rows, *a.shape[1:]), fill, np.int32)
    out[:a.shape[0]] = a
    return out


class SlotBackend(RankBackend):
    """The graph-agnostic half of a backend: configure, prefill, decode, copy_slot over
    a slot cache; subclasses implement `_run`."""

    cache_dtype = np.float32

    def __init__(self, manifest: Manifest, batch_sizes: Optional[Sequence[int]] = None):
        cfg = manifest.config
        self.shape = (cfg.num_layers, cfg.num_kv_heads // manifest.tp, cfg.head_dim)
        self.sigs = {k: manifest.signature(k) for k in ("prefill", "decode")}
        self.fixed_gears = sorted(batch_sizes) if batch_sizes else None
        self.row_gears: list[int] = []
        self.cache: Optional[SlotCache] = None
        self.cache_mode = manifest.cache_mode
        self.resident: Optional[list[np.ndarray]] = None  # [key, value], resident mode
        self.slots = self.capacity = 0

    def _run(self, kind: str, inputs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """Run graph `kind` on its inputs in signature order -> (logits, key, value)."""
        raise NotImplementedError

    def _inputs(self, kind: str, named: dict) -> list[np.ndarray]:
        """The graph's inputs in its signature's order (name order, graphs/signatures.py)."""
        return [named[name] for name in self.sigs[kind].input_names()]

    def configure(self, slots: int, capacity: int) -> dict:
        """Allocate the slot cache (once per cluster start). Returns its bytes, and
        whether `copy_slot` works (n samples of a prompt sharing its prefill)."""
        self.cache = None  # free the old one first
        self.row_gears = self.fixed_gears or batch_gears(slots)
        if self.cache_mode == RESIDENT:
            if max(self.row_gears) > slots:
                raise ValueError(f"batch gear {max(self.row_gears)} exceeds the {slots} slots: "
                                 "padding rows need slots of their own")
            self.slots, self.capacity = slots, capacity
            return self._allocate_resident(slots, capacity)
        self.cache = SlotCache(*self.shape, slots, capacity, self.cache_dtype)
        return {"cache_bytes": self.cache.nbytes, "copy_slot": True}

    # ---- resident mode ---------------------------------------------------------------
    def resident_shape(self, slots: int, capacity: int) -> tuple[int, ...]:
        layers, kv_heads, head_dim = self.shape
        return (layers, slots, kv_heads, capacity, head_dim)

    def _allocate_resident(self, slots: int, capacity: int) -> dict:
        """Host arrays (CPU): the current pair; each step's output pair replaces it."""
        self.resident = None
        shape = self.resident_shape(slots, capacity)
        self.resident = [np.zeros(shape, self.cache_dtype), np.zeros(shape, self.cache_dtype)]
        # a step holds its input pair and its output pair
        return {"cache_bytes": 2 * sum(a.nbytes for a in self.resident), "copy_slot": True}

    def _run_resident(self, kind: str, named: dict) -> np.ndarray:
        """Run `kind` on the small inputs plus the current cache pair; keep the updated
        pair it returns; return the logits."""
        key, value = self.resident
        logits, key, value = self._run(kind, self._inputs(kind, {
            **named, "key_cache": key, "value_cache": value}))
        self.resident = [key, value]
        return logits

    def _resident_rows(self, slot_ids: np.ndarray, end: np.ndarray, rows: int) -> np.ndarray:
        """The real rows' slot ids (checked: distinct, in range, writes within the
        capacity), padded up to `rows` with slots none of them uses."""
        if self.slots == 0:
            raise RuntimeError("no slot cache: configure before prefill/decode")
        check_writes(slot_ids, end, self.slots, self.capacity)
        check_distinct(slot_ids)
        ids = slot_ids.tolist()
        spare = [s for s in range(self.slots) if s not in set(ids)]
        return np.array(ids + spare[:max(0, rows - len(ids))], np.int32)

    def _prefill_resident(self, slot_ids, input_ids, start, valid_length) -> np.ndarray:
        n = input_ids.shape[0]
        rows = gear(n, self.row_gears, 1, "batch")
        slots = self._resident_rows(slot_ids, start + valid_length, rows)
        # padding columns past the capacity would wrap onto a row's own positions
        # (graphs/model.py SlotWriter); none of them is a real token
        input_ids = input_ids[:, :self.capacity]
        return self._run_resident("prefill", {
            "input_ids": pad_rows(input_ids, rows, 0), "slot_ids": slots,
            "start": pad_rows(start, rows, 0),
            "valid_length": pad_rows(valid_length, rows, 0)})[:n]

    def _decode_resident(self, slot_ids, input_ids, positions) -> np.ndarray:
        n = input_ids.shape[0]
        rows = gear(n, self.row_gears, 1, "batch")
        slots = self._resident_rows(slot_ids, positions + 1, rows)
        return self._run_resident("decode", {
            "input_ids": pad_rows(input_ids, rows, 0), "slot_ids": slots,
            "positions": pad_rows(positions, rows, PAD_POSITION)})[:n]

    def _window(self, slot_ids: np.ndarray, lengths: np.ndarray, kv_len: int, rows: int,
                kind: str):
        if self.cache is None:
            raise RuntimeError("no slot cache: configure before prefill/decode")
        if len(lengths) and int(lengths.max()) > kv_len:
            raise ValueError(f"kv_len {kv_len} is shorter than a row's {int(lengths.max())} "
                             "cached positions")
        return self.cache.window(slot_ids, kv_len, rows, kind)

    def prefill(self, slot_ids: np.ndarray, input_ids: np.ndarray, start: np.ndarray,
                valid_length: np.ndarray, kv_len: int) -> np.ndarray:
        if self.cache_mode == RESIDENT:
            return self._prefill_resident(slot_ids, input_ids, start, valid_length)
        n = input_ids.shape[0]
        rows = gear(n, self.row_gears, 1, "batch")
        key, value = self._window(slot_ids, start, kv_len, rows, "prefill")
        logits, k_new, v_new = self._run("prefill", self._inputs("prefill", {
            "input_ids": pad_rows(input_ids, rows, 0), "start": pad_rows(start, rows, 0),
            "valid_length": pad_rows(valid_length, rows, 1), "key_window": key,
            "value_window": value}))
        self.cache.write(slot_ids, start, valid_length, k_new, v_new)
        return logits[:n]

    def decode(self, slot_ids: np.ndarray, input_ids: np.ndarray, positions: np.ndarray,
               kv_len: int) -> np.ndarray:
        if self.cache_mode == RESIDENT:
            return self._decode_resident(slot_ids, input_ids, positions)
        n = input_ids.shape[0]
        rows = gear(n, self.row_gears, 1, "batch")
        key, value = self._window(slot_ids, positions, kv_len, rows, "decode")
        logits, k_new, v_new = self._run("decode", self._inputs("decode", {
            "input_ids": pad_rows(input_ids, rows, 0), "positions": pad_rows(positions, rows, 0),
            "key_window": key, "value_window": value}))
        self.cache.write(slot_ids, positions, np.ones(n, np.int32), k_new, v_new)
        return logits[:n]

    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        if self.cache_mode != RESIDENT:
            self.cache.copy(src, dst, length)
            return
        self._resident_rows(np.array([src, *dst], np.int32), np.array([length]), 0)
        for i, cache in enumerate(self.resident):
            if not cache.flags.writeable:  # a graph output may be a read-only view
                cache = self.resident[i] = cache.copy()
            cache[:, list(dst), :, :length] = cache[:, src:src + 1, :, :length]
