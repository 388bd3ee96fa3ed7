"""What a rank does with each coordinator op (runtime/worker_protocol.py), over its
RankBackend: the same code in a worker process (runtime/worker.py) and in-process
(runtime/executor.py InProcessExecutor).

Sampling happens here, next to the logits (runtime/vocab_sampling.py): with the whole
vocabulary on this rank (tp = 1) the rank chooses the tokens; with a share of it, it
sends its candidates. The last step's logits are kept for a second round ("resample").
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dsflow.runtime.backends.base import RankBackend
from dsflow.runtime.vocab_sampling import rank_candidates, sample_rows


class RankOps:
    def __init__(self, backend: RankBackend, rank: int, tp: int):
        self.backend, self.rank, self.tp = backend, rank, tp
        self.vocab_limit = 0
        self.last: Optional[np.ndarray] = None  # the last step's logits slice

    def handle(self, op: str, payload: dict) -> tuple[str, Any]:
        """(reply op, body) for one request; raises what the backend raises."""
        if op in ("prefill", "decode"):
            return self._step(op, payload)
        if op == "resample":
            offset = self.rank * self.last.shape[1]
            return "candidates", [rank_candidates(self.last[s.row], offset, self.vocab_limit,
                                                  s, payload["k"]) for s in payload["sample"]]
        if op == "configure":
            self.vocab_limit = payload["vocab_limit"]
            return "ok", self.backend.configure(payload["slots"], payload["capacity"])
        if op == "copy_slot":
            self.backend.copy_slot(payload["src"], payload["dst"], payload["length"])
            return "ok", {}
        raise ValueError(f"unknown op {op!r}")

    def _step(self, op: str, p: dict) -> tuple[str, Any]:
        if op == "prefill":
            logits = self.backend.prefill(p["slot_ids"], p["input_ids"], p["start"],
                                          p["valid_length"], p["kv_len"])
        else:
            logits = self.backend.decode(p["slot_ids"], p["input_ids"], p["positions"],
                                         p["kv_len"])
        specs = p.get("sample")
        if specs is None:
            return "logits", logits
        self.last = logits
        finish = self.tp == 1
        reply = sample_rows(logits, self.rank * logits.shape[1], self.vocab_limit, specs,
                            finish)
        return ("picks" if finish else "candidates"), reply
