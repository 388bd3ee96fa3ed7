"""FakeEngine: the real Engine (scheduler, engine core, output processor) over a fake
executor: an in-process rank whose "model" is a deterministic function, with no
MindSpore and no artifacts, for testing the HTTP layer in milliseconds.

The fake rank (`FakeBackend`, a RankBackend) keeps each slot's tokens as its "KV
cache". Its logits make the greedy choice a deterministic function of the prompt and
the position (`fake_token`), and give every other id whose text is a plain ASCII word
nearly the same score (so sampled text is words, reproducible with a seed); every
other id is impossible. Tests steer it through `gate` (cleared: no step is planned),
`fail()` (a rank "dies": in-flight requests get WorkerError, health turns "failed"),
`restart_failures` and `poison` (a prompt token the rank refuses: a backend error).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import numpy as np

from dsflow.runtime import Engine, SamplingParams, WorkerError
from dsflow.runtime.backends.base import RankBackend
from dsflow.runtime.engine import EngineOptions
from dsflow.runtime.engine_core import EngineCore
from dsflow.runtime.executor import InProcessExecutor
from dsflow.runtime.slot_plan import SlotPlan
from dsflow.runtime.tokenizer import Tokenizer


def word_ids(tokenizer: Tokenizer) -> list[int]:
    return [i for i in range(1000, 4000)
            if (t := tokenizer.decode([i])).isascii() and t.strip().isalpha()]


def fake_token(words: list[int], prompt: list[int], position: int) -> int:
    """The fake model's greedy choice: depends on the prompt and the position only."""
    return words[(sum(prompt) * 31 + position * 17) % len(words)]


class FakeBackend(RankBackend):
    """One rank of the fake model; a slot's cache is its tokens (and its prompt length:
    the positions written by prefills)."""

    def __init__(self, words: list[int], vocab: int, step_s: float,
                 failed: Callable[[], Optional[str]], poison: Callable[[], Optional[int]]):
        self.words, self.vocab, self.step_s, self.failed = words, vocab, step_s, failed
        self.poison = poison
        self.base = np.full(vocab, -1e9, np.float32)
        self.base[words] = 0.0
        self.slots: list[list[int]] = []
        self.prompt_len: list[int] = []

    def configure(self, slots: int, capacity: int) -> dict:
        self.slots = [[] for _ in range(slots)]
        self.prompt_len = [0] * slots
        return {"cache_bytes": 0, "copy_slot": True}

    def _logits(self, slot: int) -> np.ndarray:
        tokens, n = self.slots[slot], self.prompt_len[slot]
        row = self.base.copy()
        row[fake_token(self.words, tokens[:n], len(tokens) - n)] = 1e-3
        return row

    def _step(self) -> None:
        detail = self.failed()
        if detail:
            raise WorkerError(detail)  # a dead rank: the cluster's error, not the step's
        if self.step_s:
            time.sleep(self.step_s)  # pacing of the fake "model", not synchronisation

    def prefill(self, slot_ids, input_ids, start, valid_length, kv_len) -> np.ndarray:
        self._step()
        if self.poison() is not None and self.poison() in input_ids:
            raise ValueError(f"token {self.poison()} cannot be run (fake backend error)")
        for slot, ids, s, n in zip(slot_ids.tolist(), input_ids.tolist(), start.tolist(),
                                   valid_length.tolist()):
            self.slots[slot][s:] = ids[:n]
            self.prompt_len[slot] = s + n
        return np.stack([self._logits(slot) for slot in slot_ids.tolist()])

    def decode(self, slot_ids, input_ids, positions, kv_len) -> np.ndarray:
        self._step()
        for slot, token, p in zip(slot_ids.tolist(), input_ids.tolist(), positions.tolist()):
            self.slots[slot][p:] = [token]
        return np.stack([self._logits(slot) for slot in slot_ids.tolist()])

    def copy_slot(self, src: int, dst: Sequence[int], length: int) -> None:
        for d in dst:
            self.slots[d] = self.slots[src][:length]
            self.prompt_len[d] = self.prompt_len[src]


class FakeExecutor(InProcessExecutor):
    """The in-process executor; a "dead rank" (fail()) shows in check_alive."""

    def __init__(self, engine: "FakeEngine"):
        backend = FakeBackend(engine.words, engine.vocab_size, engine.step_s, engine._failure,
                              lambda: engine.poison)
        super().__init__(backend, engine.plan, engine.pad_id, engine.vocab_limit)
        self.engine = engine

    def _request(self, op: str, payload: dict):
        try:
            return super()._request(op, payload)
        except Exception as e:
            if isinstance(e.__cause__, WorkerError):
                raise e.__cause__ from None
            raise

    def check_alive(self) -> None:
        detail = self.engine._failure()
        if detail:
            raise WorkerError(detail)


class GatedCore(EngineCore):
    """Plans no step while the engine's gate is cleared."""

    def __init__(self, gate: threading.Event, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = gate

    def _wait_for_work(self) -> bool:
        while True:
            if not super()._wait_for_work():
                return False
            if self.gate.is_set():
                return True
            self.cond.wait(0.01)  # the gate is a plain Event: look again


@dataclass
class _SeqView:
    """The engine's view of one sequence, shaped as the old fake's (`.c.token_ids`,
    `.c.finish_reason`), for tests that wait on engine progress."""
    seq: object

    @property
    def c(self):
        return SimpleNamespace(token_ids=[0] * self.seq.generated,
                               finish_reason=self.seq.finish)


@dataclass
class Submitted:
    prompt_token_ids: list[int]
    params: SamplingParams
    handle: object
    seqs: list[_SeqView]

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled


class FakeEngine(Engine):
    def __init__(self, tokenizer_dir, slots: int = 8, max_queue: int = 64,
                 max_seq_len: int = 512, step_s: float = 0.0, model_name: str = "fake-model"):
        self.options = EngineOptions(max_queue=max_queue)
        tokenizer = Tokenizer(tokenizer_dir)
        self.manifest = SimpleNamespace(max_seq_len=max_seq_len, tp=1)
        self.words = word_ids(tokenizer)
        self.step_s = step_s
        self.gate = threading.Event()   # cleared: the engine plans no step
        self.gate.set()
        self.restart_failures = 0       # restart() fails this many times first
        self.restarts = 0
        self.poison: Optional[int] = None  # a prompt token whose prefill the rank refuses
        self.submitted: list[Submitted] = []
        self._failed: Optional[str] = None
        self._setup(tokenizer, SlotPlan(slots, max_seq_len, 256, 0), SamplingParams(),
                    model_name, tokenizer.vocab_size)

    def _make_executor(self):
        return FakeExecutor(self)

    def _make_core(self):
        return GatedCore(self.gate, self.scheduler, self.executor, self._cond,
                         self.vocab_limit)

    def _failure(self) -> Optional[str]:
        return self._failed

    # ---- what the server calls, recorded --------------------------------------------------
    def submit_many(self, prompts, params=None, *, chat=False, suffix=None):
        params = params or self.default_params
        handle = super().submit_many(prompts, params, chat=chat, suffix=suffix)
        with self._cond:
            for rid, ids in zip(handle.request_ids, handle.prompts):
                request = self.core.live[rid].request if rid in self.core.live else None
                seqs = [_SeqView(s) for s in request.seqs] if request else []
                self.submitted.append(Submitted(ids, params, handle, seqs))
            self._cond.notify_all()
        return handle

    def restart(self) -> None:
        if self.restart_failures > 0:
            self.restart_failures -= 1
            raise WorkerError("rank 0 failed to start (fake)")
        self._failed = None
        super().restart()
        self.restarts += 1

    def close(self) -> None:
        self.gate.set()
        super().close()

    # ---- test controls --------------------------------------------------------------------
    def fail(self, detail: str = "rank 0 exited unexpectedly (code -9)") -> None:
        """What a dead rank does to the real engine: every in-flight request errors."""
        self._failed = detail
        with self._cond:
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("FakeEngine.wait_until: condition not reached")
                self._cond.wait(min(left, 0.01))
