"""The one interface every rank backend implements (MindSpore GraphCell, MindSpore Lite,
ONNX Runtime): what a worker calls, declared once so no caller probes with getattr.

A backend runs one rank's prefill and decode graphs over a slot KV cache that it owns.
It returns that rank's logits slice, `float32 [rows, vocab_padded / tp]`; sampling is
done next to it by the worker (runtime/worker.py), so only token ids (plus logprobs /
top-k when asked) travel back to the coordinator.

Positions, lengths and slot ids are int32 numpy arrays whatever the compute dtype.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

import numpy as np

Report = Callable[[str], None]


class RankBackend(ABC):
    """One rank of a model over a slot KV cache.

    `configure` is called once per cluster start, before any step; the other calls
    follow in any order. Every method may raise: the worker reports the error for the
    request that caused it.
    """

    #: a line to show the user at start-up (e.g. a release mismatch), or None
    version_warning: Optional[str] = None

    @abstractmethod
    def configure(self, slots: int, capacity: int) -> dict:
        """Allocate `slots` sequences of `capacity` positions. Returns at least
        {"cache_bytes": int, "copy_slot": bool} (whether `copy_slot` works)."""

    @abstractmethod
    def prefill(self, slot_ids: np.ndarray, input_ids: np.ndarray, start: np.ndarray,
                valid_length: np.ndarray, kv_len: int) -> np.ndarray:
        """Feed `input_ids [rows, seq]` (right-padded, `valid_length` real tokens) at
        positions `start..` of each row's slot. Returns the logits of each row's last
        real token. `kv_len` >= every row's `start` (the window a step attends over)."""

    @abstractmethod
    def decode(self, slot_ids: np.ndarray, input_ids: np.ndarray, positions: np.ndarray,
               kv_len: int) -> np.ndarray:
        """One token per row at `positions` of its slot; returns its logits."""

    @abstractmethod
    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into each `dst`."""

    def gears(self) -> list:
        """Shapes compiled lazily, which `warm_up` compiles at start-up (none by default)."""
        return []

    def warm_up(self, report: Report = lambda line: None) -> float:
        """Run every gear once so the first request does not pay compiles. Seconds."""
        return 0.0
