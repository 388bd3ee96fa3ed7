"""Worker backend on ONNX Runtime's CPU provider, for `dsexport build --target onnx`.

The slot cache is two numpy arrays [layers, slots, kv_heads, capacity, head_dim] in this
process, as in the window mode, but no window is ever gathered: the graph's
GroupQueryAttention takes each layer's past K/V [batch, kv_heads, capacity, head_dim]
and, when its present output is bound to the same memory, writes the new tokens' K/V
in place and attends over each row's own length (graphs/signatures.py, "inplace").
For slots r..r+n-1, `key[layer, r:r+n]` is one contiguous block, so a step binds
views of the cache through IO binding and copies nothing.

A step's rows must therefore be consecutive physical rows. Slot ids (the scheduler's
names) map to physical rows; when a step names slots whose rows are not consecutive,
rows are swapped (only their written positions are copied) until they are. With
continuous batching the running set changes only when a sequence joins or leaves,
so most steps swap nothing (tests/test_onnx_backend.py counts the swaps).

Threads: intra-op threads = the cores the cluster gives this worker (DSFLOW_THREADS),
one inter-op thread (the graph is a chain). Spinning: see `SPIN_ENV`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dsflow.artifacts.manifest import Manifest
from dsflow.common.errors import DsflowError
from dsflow.graphs.signatures import INPLACE, layer_tensor_names
from dsflow.runtime.backends.base import RankBackend
from dsflow.runtime.slot_cache import check_distinct, check_writes
from dsflow.runtime.worker_protocol import THREADS_ENV

# How ORT's idle intra-op threads wait for the next op: "off" (sleep at once: a futex
# wake per parallel op), "on" (ORT's own spinning, unbounded: it steals the cores of
# other processes on a busy host) or a number of microseconds to spin before sleeping
# (session.intra_op.spin_duration_us, ONNX Runtime 1.26+). The default bounds it at
# 200 us: it covers the gaps between the ops of a step but not the gap between steps.
# Measured in docs/BENCHMARKS.md ("Thread spinning"): on a host whose cores the server
# owns, steps 3-15% faster than "off" and serving +5-10% tokens/s; beside processes
# that compete for the cores, steps as slow as with "on" (11-55% slower than "off"):
# set "off" there.
SPIN_ENV = "DSFLOW_ORT_SPIN"
DEFAULT_SPIN = "200"
BOUNDED_SPIN_ORT = (1, 26)  # first release that reads spin_duration_us (its wheels' strings)
# GroupQueryAttention with past/present sharing one buffer and chunks after a past
# (measured here with 1.32); older releases are refused rather than run wrongly.
MIN_ORT = (1, 22)
INSTALL = "pip install 'onnxruntime>=1.22'"


def import_onnxruntime():
    """onnxruntime, or one line saying what to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DsflowError(f"these artifacts need ONNX Runtime, which is not installed: "
                          f"{INSTALL}") from None
    if ort_version(ort) < MIN_ORT:
        raise DsflowError(f"onnxruntime {ort.__version__} is too old for these artifacts "
                          f"(GroupQueryAttention with an in-place cache): {INSTALL}")
    return ort


def ort_version(ort) -> tuple[int, ...]:
    return tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())


def spin_entries(setting: str, version: tuple[int, ...]) -> dict[str, str]:
    """Session config entries for a DSFLOW_ORT_SPIN setting ("off", "on" or
    microseconds). A bound needs ORT 1.26+; older releases ignore the key and would
    spin unbounded, so there the bound falls back to "off"."""
    value = setting.strip().lower()
    if value in ("off", "0"):
        return {"session.intra_op.allow_spinning": "0"}
    if value in ("on", "1"):
        return {"session.intra_op.allow_spinning": "1"}
    if not value.isdigit():
        raise DsflowError(f"{SPIN_ENV}={setting!r}: expected off, on or a number of "
                          "microseconds (e.g. 200)")
    if version < BOUNDED_SPIN_ORT:
        return {"session.intra_op.allow_spinning": "0"}
    return {"session.intra_op.allow_spinning": "1",
            "session.intra_op.spin_duration_us": value}


def session_options(ort, threads: Optional[int] = None, spin: Optional[str] = None):
    """spin: a DSFLOW_ORT_SPIN setting; None reads the variable (default bounded)."""
    so = ort.SessionOptions()
    env_threads = os.environ.get(THREADS_ENV)
    so.intra_op_num_threads = threads or int(env_threads or 0)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    setting = os.environ.get(SPIN_ENV, DEFAULT_SPIN) if spin is None else spin
    for key, value in spin_entries(setting, ort_version(ort)).items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = 3
    return so


def open_session(ort, path: Path, so):
    """An InferenceSession over a model file; a damaged file is named in one line."""
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DsflowError(f"{path}: ONNX Runtime cannot load this model ({first}); "
                          "rebuild the artifacts (or check them with dsrun --verify)") from None


class OnnxRuntimeBackend(RankBackend):
    """One rank (tp is 1) of an ONNX build over an in-place slot cache."""

    cache_dtype = np.float32

    def __init__(self, manifest: Manifest, rank: int = 0, threads: Optional[int] = None,
                 spin: Optional[str] = None):
        if manifest.cache_mode != INPLACE:
            raise DsflowError(f"{manifest.root}: not an ONNX build (cache mode "
                              f"{manifest.cache_mode})")
        ort = import_onnxruntime()
        self._ort = ort
        cfg = manifest.config
        self.layers = cfg.num_layers
        self.kv_heads = cfg.num_kv_heads // manifest.tp
        self.head_dim = cfg.head_dim
        self.path = manifest.graph_path(rank, "decode")
        if manifest.graph_path(rank, "prefill") != self.path:
            raise DsflowError(f"{manifest.root}: prefill and decode must be one ONNX model")
        self.session = open_session(ort, self.path, session_options(ort, threads, spin))
        self.key_names = layer_tensor_names("past_key", self.layers)
        self.value_names = layer_tensor_names("past_value", self.layers)
        self.present_key = layer_tensor_names("present_key", self.layers)
        self.present_value = layer_tensor_names("present_value", self.layers)
        self.key: Optional[np.ndarray] = None
        self.value: Optional[np.ndarray] = None
        self.slots = self.capacity = 0
        self.swaps = 0  # rows moved to make a step's rows consecutive (for tests)

    # ---- cache ------------------------------------------------------------------------
    def configure(self, slots: int, capacity: int) -> dict:
        self._bindings: dict[tuple[int, int], tuple] = {}  # views of the old cache first
        self.key = self.value = None  # then the old cache
        shape = (self.layers, slots, self.kv_heads, capacity, self.head_dim)
        self.key = np.zeros(shape, self.cache_dtype)
        self.value = np.zeros(shape, self.cache_dtype)
        self.slots, self.capacity = slots, capacity
        self.row_of = list(range(slots))   # slot id -> physical row
        self.slot_at = list(range(slots))  # physical row -> slot id
        self.written = [0] * slots         # positions written, per physical row
        return {"cache_bytes": self.key.nbytes + self.value.nbytes, "copy_slot": True}

    def _swap_rows(self, a: int, b: int) -> None:
        n = max(self.written[a], self.written[b])
        for cache in (self.key, self.value):
            held = cache[:, a, :, :n].copy()
            cache[:, a, :, :n] = cache[:, b, :, :n]
            cache[:, b, :, :n] = held
        sa, sb = self.slot_at[a], self.slot_at[b]
        self.slot_at[a], self.slot_at[b] = sb, sa
        self.row_of[sa], self.row_of[sb] = b, a
        self.written[a], self.written[b] = self.written[b], self.written[a]
        self.swaps += 1

    def _consecutive_rows(self, slot_ids: np.ndarray) -> tuple[int, np.ndarray]:
        """(first physical row, each slot's index within the run) for a step's slots,
        swapping rows first if they are not consecutive."""
        check_distinct(slot_ids)
        ids = slot_ids.tolist()
        rows = [self.row_of[s] for s in ids]
        first = min(rows)
        if max(rows) - first + 1 != len(rows):
            # keep the run where most of it already is: start at the lowest row that
            # leaves room, then pull in every slot not yet inside
            first = min(first, self.slots - len(ids))
            inside = set(range(first, first + len(ids)))
            free = sorted(inside - set(rows))
            for s in ids:
                if self.row_of[s] not in inside:
                    self._swap_rows(self.row_of[s], free.pop(0))
            rows = [self.row_of[s] for s in ids]
        return first, np.array(rows, np.int64) - first

    def _binding(self, first: int, n: int):
        """An IO binding with every layer's past and present bound to key/value[layer,
        first:first + n] (views: in place), and logits to a fresh output. Kept per run
        of rows: binding 4 x layers tensors costs more than a small step's attention,
        and only the three small inputs change between steps."""
        entry = self._bindings.get((first, n))
        if entry is None:
            ov = self._ort.OrtValue.ortvalue_from_numpy
            keys = [ov(self.key[i, first:first + n]) for i in range(self.layers)]
            values = [ov(self.value[i, first:first + n]) for i in range(self.layers)]
            binding = self.session.io_binding()
            binding.bind_output("logits")  # first: get_outputs() follows binding order
            for i in range(self.layers):
                binding.bind_ortvalue_input(self.key_names[i], keys[i])
                binding.bind_ortvalue_input(self.value_names[i], values[i])
                binding.bind_ortvalue_output(self.present_key[i], keys[i])
                binding.bind_ortvalue_output(self.present_value[i], values[i])
            if len(self._bindings) > 64:
                self._bindings.clear()
            entry = self._bindings[(first, n)] = (binding, keys, values)
        return entry[0]

    # ---- steps ------------------------------------------------------------------------
    def _run(self, slot_ids: np.ndarray, input_ids: np.ndarray, start: np.ndarray,
             valid_length: np.ndarray) -> np.ndarray:
        """One graph call over consecutive rows; logits in the caller's row order."""
        if self.key is None:
            raise RuntimeError("no slot cache: configure before prefill/decode")
        n, seq = input_ids.shape
        check_writes(slot_ids, start + seq, self.slots, self.capacity)
        first, place = self._consecutive_rows(slot_ids)
        order = np.argsort(place)  # caller rows in physical order
        binding = self._binding(first, n)
        # bind_cpu_input keeps a pointer, not the array: these must outlive the run
        small = {"input_ids": np.ascontiguousarray(input_ids[order], np.int32),
                 "start": np.ascontiguousarray(start[order], np.int32),
                 "valid_length": np.ascontiguousarray(valid_length[order], np.int32)}
        for name, arr in small.items():
            binding.bind_cpu_input(name, arr)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        for s, b in zip(slot_ids.tolist(), start.tolist()):
            row = self.row_of[s]
            self.written[row] = max(self.written[row], b + seq)
        out = np.empty_like(logits)
        out[order] = logits
        return out

    def prefill(self, slot_ids: np.ndarray, input_ids: np.ndarray, start: np.ndarray,
                valid_length: np.ndarray, kv_len: int) -> np.ndarray:
        start = np.asarray(start, np.int32)
        valid_length = np.asarray(valid_length, np.int32)
        calls = []
        for rows in self._graph_calls(start, valid_length):
            seq = max(1, int(valid_length[rows].max()))  # padding past every row's end: not fed
            calls.append((rows, self._run(slot_ids[rows], input_ids[rows, :seq], start[rows],
                                          valid_length[rows])))
        out = np.empty((len(slot_ids), calls[0][1].shape[1]), np.float32)
        for rows, logits in calls:
            out[rows] = logits
        return out

    @staticmethod
    def _graph_calls(start: np.ndarray, valid_length: np.ndarray) -> list[np.ndarray]:
        """A prefill's rows grouped into as few graph calls as GroupQueryAttention's CPU
        kernel takes (onnxruntime 1.32): first chunks (every start 0) together, one-token
        chunks (after a reused prefix, or a prompt's last token) together as a decode
        step, and each other chunk after a past alone ("batch_size must be 1 when
        sequence_length > 1 and past context is given"). Every graph call reads all the
        weights (~14 ms for the 125M model in fp32), so the count matters more than the
        tokens. Padding is written only by first chunks, up to the longest of them: inside
        every slot (tests/test_onnx.py)."""
        rows = np.arange(len(start))
        first = rows[start == 0]
        single = rows[(valid_length == 1) & (start > 0)]
        alone = rows[(start > 0) & (valid_length != 1)]  # every row is in one group
        return [g for g in (first, single) if len(g)] + [alone[i:i + 1] for i in range(len(alone))]

    def decode(self, slot_ids: np.ndarray, input_ids: np.ndarray, positions: np.ndarray,
               kv_len: int) -> np.ndarray:
        n = len(slot_ids)
        return self._run(slot_ids, np.asarray(input_ids, np.int32).reshape(n, 1),
                         np.asarray(positions, np.int32), np.ones(n, np.int32))

    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        check_writes(np.array([src, *dst]), np.array([length]), self.slots, self.capacity)
        a = self.row_of[src]
        for d in dst:
            b = self.row_of[d]
            self.key[:, b, :, :length] = self.key[:, a, :, :length]
            self.value[:, b, :, :length] = self.value[:, a, :, :length]
            self.written[b] = max(self.written[b], length)
