"""The executor: runs a step's rows on the ranks and returns one token per sampled
sequence. One interface for every backend (MindSpore, Lite, ONNX Runtime), whether its
ranks are worker processes (`ProcessExecutor`) or this process (`InProcessExecutor`,
tp = 1); only the transport differs (`_request`), everything else is shared here.

Sampling happens on the ranks (runtime/worker_ops.py, runtime/vocab_sampling.py): a
step sends token ids and sampling specs, and gets back token ids (tp = 1) or each
rank's candidates, merged here (tp > 1), so the bytes of a step grow with batch x k,
not batch x vocab. Whole logits travel only for teacher forcing (`*_logits`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import numpy as np

from dsflow.runtime.backends.base import RankBackend
from dsflow.runtime.slot_plan import SlotPlan
from dsflow.runtime.vocab_sampling import Pick, SampleSpec, merge, next_k
from dsflow.runtime.worker_ops import RankOps
from dsflow.runtime.worker_protocol import StepError

PrefillRows = Sequence[tuple[int, Sequence[int], int]]  # (slot, chunk tokens, start)


class Executor(ABC):
    """tp ranks over one slot KV cache each, driven in lockstep."""

    def __init__(self, tp: int, plan: SlotPlan, pad_id: int, vocab_limit: int):
        self.tp, self.plan, self.pad_id, self.vocab_limit = tp, plan, pad_id, vocab_limit
        self.copy_slot_supported = True
        self.second_rounds = 0  # rows whose candidates did not decide (vocab_sampling)

    # ---- the transport: what differs between executors ----------------------------------
    @abstractmethod
    def _request(self, op: str, payload: dict) -> list[Any]:
        """Send one op to every rank; the replies' bodies in rank order. Raises
        WorkerError (the ranks are lost) or StepError (they refused this op)."""

    @abstractmethod
    def check_alive(self) -> None:
        """Raise WorkerError if a rank is known to be gone; never blocks."""

    @abstractmethod
    def kill(self) -> None:
        """Stop every rank now (one hangs: nothing would answer an orderly close)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the ranks in order; idempotent."""

    @property
    def bytes_received(self) -> int:
        """Bytes that came back from the ranks so far (0 where nothing is serialised)."""
        return 0

    # ---- shared ------------------------------------------------------------------------
    def configure(self) -> None:
        replies = self._request("configure", {"slots": self.plan.slots,
                                              "capacity": self.plan.capacity,
                                              "vocab_limit": self.vocab_limit})
        self.copy_slot_supported = all(r.get("copy_slot", True) for r in replies)

    def prefill(self, rows: PrefillRows, specs: Optional[list[SampleSpec]]):
        """Feed each row's chunk at its start; picks for `specs`, or the last tokens'
        logits [rows, vocab] when specs is None."""
        seq = self.plan.chunk_len(max(len(t) for _, t, _ in rows))
        ids = np.full((len(rows), seq), self.pad_id, np.int32)
        for b, (_, tokens, _) in enumerate(rows):
            ids[b, :len(tokens)] = tokens
        start = np.array([s for _, _, s in rows], np.int32)
        return self._run("prefill", {
            "slot_ids": np.array([slot for slot, _, _ in rows], np.int32), "input_ids": ids,
            "start": start, "valid_length": np.array([len(t) for _, t, _ in rows], np.int32),
            "kv_len": self.plan.window(int(start.max())), "sample": specs})

    def decode(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               specs: Optional[list[SampleSpec]]):
        return self._run("decode", {
            "slot_ids": np.array(slots, np.int32), "input_ids": np.array(tokens, np.int32),
            "positions": np.array(positions, np.int32),
            # > every position: the Ascend kernels write the new token into the window
            "kv_len": self.plan.window(max(positions) + 1), "sample": specs})

    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        self._request("copy_slot", {"src": src, "dst": list(dst), "length": length})

    def _run(self, op: str, payload: dict):
        replies = self._request(op, payload)
        specs = payload["sample"]
        if specs is None:
            return np.concatenate(replies, axis=1)
        if self.tp == 1:
            return replies[0]
        return self._merge(specs, replies)

    def _merge(self, specs: list[SampleSpec], replies: list[list]) -> list[Pick]:
        picks = [merge(s, [rank[i] for rank in replies]) for i, s in enumerate(specs)]
        k: Optional[int] = None
        while True:
            undecided = [i for i, p in enumerate(picks) if p is None]
            if not undecided:
                return picks
            self.second_rounds += len(undecided)
            k = min(next_k(specs[i], k) for i in undecided)
            more = self._request("resample", {"sample": [specs[i] for i in undecided],
                                              "k": k})
            for j, i in enumerate(undecided):
                picks[i] = merge(specs[i], [rank[j] for rank in more])


class ProcessExecutor(Executor):
    """Ranks in worker processes (runtime/cluster.py): MindSpore at any tp, Lite."""

    def __init__(self, cluster, plan: SlotPlan, pad_id: int, vocab_limit: int,
                 step_timeout_s: Optional[float] = None):
        super().__init__(cluster.tp, plan, pad_id, vocab_limit)
        self.cluster = cluster
        self.step_timeout_s = step_timeout_s

    def _request(self, op: str, payload: dict) -> list[Any]:
        return self.cluster.request(op, payload, timeout=self.step_timeout_s)

    def check_alive(self) -> None:
        self.cluster.check_alive()

    def kill(self) -> None:
        self.cluster.kill()

    def close(self) -> None:
        self.cluster.close()

    @property
    def bytes_received(self) -> int:
        return self.cluster.bytes_received


class InProcessExecutor(Executor):
    """One rank (tp = 1) in this process: the same ops, called directly."""

    def __init__(self, backend: RankBackend, plan: SlotPlan, pad_id: int, vocab_limit: int):
        super().__init__(1, plan, pad_id, vocab_limit)
        self.ops = RankOps(backend, 0, 1)

    def _request(self, op: str, payload: dict) -> list[Any]:
        try:
            _, body = self.ops.handle(op, payload)
        except Exception as e:  # as a worker process answers: this op failed, go on
            raise StepError(f"rank 0 could not run {op!r}: {type(e).__name__}: {e}") from e
        return [body]

    def check_alive(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass
