"""What every worker backend shares: the slot cache and the window plumbing.

A backend subclass only knows how to run one of its graphs on numpy inputs
(`_run(kind, inputs) -> (logits, key, value)`); this class turns the worker protocol's
requests (slot ids, tokens, positions, kv_len) into graph inputs: batch padded to a
gear, a window gathered from the slots, and the returned K/V written back.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dsflow.artifacts.manifest import Manifest
from dsflow.runtime.slot_cache import SlotCache, batch_gears, gear


def pad_rows(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """`a` with its first axis padded to `rows` (batch gear), contiguous int32."""
    a = np.ascontiguousarray(a, dtype=np.int32)
    if a.shape[0] == rows:
        return a
    out = np.full((rows, *a.shape[1:]), fill, np.int32)
    out[:a.shape[0]] = a
    return out


class SlotBackend:
    """The protocol side of a backend: configure, prefill, decode, copy_slot."""

    cache_dtype = np.float32

    def __init__(self, manifest: Manifest, batch_sizes: Optional[Sequence[int]] = None):
        cfg = manifest.config
        self.shape = (cfg.num_layers, cfg.num_kv_heads // manifest.tp, cfg.head_dim)
        self.sigs = {k: manifest.signature(k) for k in ("prefill", "decode")}
        self.fixed_gears = sorted(batch_sizes) if batch_sizes else None
        self.row_gears: list[int] = []
        self.cache: Optional[SlotCache] = None

    def _run(self, kind: str, inputs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """Run graph `kind` on its inputs in signature order -> (logits, key, value)."""
        raise NotImplementedError

    def _inputs(self, kind: str, named: dict) -> list[np.ndarray]:
        """The graph's inputs in its signature's order (name order, graphs/signatures.py)."""
        return [named[name] for name in self.sigs[kind].input_names()]

    def configure(self, slots: int, capacity: int) -> dict:
        """Allocate the slot cache (once per cluster start)."""
        self.cache = None  # free the old one first
        self.cache = SlotCache(*self.shape, slots, capacity, self.cache_dtype)
        self.row_gears = self.fixed_gears or batch_gears(slots)
        return {"cache_bytes": self.cache.nbytes}

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
        n = input_ids.shape[0]
        rows = gear(n, self.row_gears, 1, "batch")
        key, value = self._window(slot_ids, positions, kv_len, rows, "decode")
        logits, k_new, v_new = self._run("decode", self._inputs("decode", {
            "input_ids": pad_rows(input_ids, rows, 0), "positions": pad_rows(positions, rows, 0),
            "key_window": key, "value_window": value}))
        self.cache.write(slot_ids, positions, np.ones(n, np.int32), k_new, v_new)
        return logits[:n]

    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        self.cache.copy(src, dst, length)
