"""FakeEngine: the part of dsflow.runtime.Engine a server uses (submit -> RequestHandle
with sync/async iteration and cancel, health, restart, the four errors), in-process and
without MindSpore, for testing the HTTP layer in milliseconds.

A scheduler thread runs "decode steps": each step admits waiting requests into free
slots (FIFO, n slots per request) and gives every running sequence one token. Tokens
are a deterministic function of the prompt and the position (greedy), or drawn from a
per-sequence generator (temperature > 0, reproducible with a seed), chosen among ids
whose text is a plain ASCII word so that text and token counts are easy to check.
Tests steer it through `gate` (hold the steps), `fail()` (a rank "dies": in-flight
requests get WorkerError, health turns "failed") and `restart_failures`.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
import uuid
from collections import deque
from types import SimpleNamespace
from typing import Callable, Optional

from dsflow.runtime import (CacheLimitError, Completion, EngineClosedError, QueueFullError,
                            SamplingParams, StreamEvent, TokenLogprob, WorkerError)
from dsflow.runtime.tokenizer import Tokenizer

FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"


def word_ids(tokenizer: Tokenizer) -> list[int]:
    return [i for i in range(1000, 4000)
            if (t := tokenizer.decode([i])).isascii() and t.strip().isalpha()]


def fake_token(words: list[int], prompt: list[int], position: int) -> int:
    """The fake model's greedy choice: depends on the prompt and the position only."""
    return words[(sum(prompt) * 31 + position * 17) % len(words)]


class _Sequence:
    def __init__(self, handle: "FakeHandle", index: int):
        self.handle = handle
        self.c = Completion(index, list(handle.prompt_token_ids), [], "", None,
                            [] if handle.params.logprobs is not None else None)
        seed = handle.params.seed
        self.rng = random.Random(seed if seed is not None else random.random())


class FakeHandle:
    """RequestHandle: events of the n sequences, iterable from threads or asyncio."""

    def __init__(self, engine: "FakeEngine", ids: list[int], params: SamplingParams):
        self.engine = engine
        self.request_id = uuid.uuid4().hex
        self.prompt_token_ids = ids
        self.params = params
        self.seqs = [_Sequence(self, j) for j in range(params.n)]
        self.cancelled = False
        self._events: deque = deque()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._cond = threading.Condition()
        self._wakers: list[Callable[[], None]] = []

    # ---- producer side (the scheduler thread) ---------------------------------------------
    def _push(self, event: Optional[StreamEvent] = None, error: Optional[BaseException] = None,
              close: bool = False) -> None:
        with self._cond:
            if event is not None:
                self._events.append(event)
            self._error = self._error or error
            self._closed = self._closed or close or error is not None
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # ---- consumer side ------------------------------------------------------------------
    def _next(self) -> tuple[bool, Optional[StreamEvent]]:
        """(True, event) | (True, None) when finished | (False, None) when nothing yet."""
        if self._events:
            return True, self._events.popleft()
        if self._error is not None:
            raise self._error
        return self._closed, None

    def __iter__(self):
        while True:
            with self._cond:
                ready, event = self._next()
                while not ready:
                    self._cond.wait()
                    ready, event = self._next()
            if event is None:
                return
            yield event

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        waker = lambda: loop.call_soon_threadsafe(flag.set)  # noqa: E731
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                flag.clear()
                with self._cond:
                    ready, event = self._next()
                if not ready:
                    await flag.wait()
                    continue
                if event is None:
                    return
                yield event
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def cancel(self) -> None:
        self.cancelled = True
        self.engine._withdraw(self)
        self._push(close=True)

    def result(self, timeout: Optional[float] = None) -> list[Completion]:
        done = [e.finished for e in self if e.finished]
        return sorted(done, key=lambda c: c.index)


class FakeEngine:
    def __init__(self, tokenizer_dir, slots: int = 8, max_queue: int = 64,
                 max_seq_len: int = 512, step_s: float = 0.0, model_name: str = "fake-model"):
        self.tokenizer = Tokenizer(tokenizer_dir)
        self.manifest = SimpleNamespace(max_seq_len=max_seq_len, tp=1)
        self.plan = SimpleNamespace(capacity=max_seq_len, slots=slots)
        self.model_name = model_name
        self.default_params = SamplingParams()
        self.slots, self.max_queue, self.step_s = slots, max_queue, step_s
        self.words = word_ids(self.tokenizer)
        self.gate = threading.Event()   # cleared: the scheduler holds (no step runs)
        self.gate.set()
        self.state, self.detail = "ready", ""
        self.restart_failures = 0       # restart() fails this many times first
        self.restarts = 0
        self.submitted: list[FakeHandle] = []
        self._waiting: deque[FakeHandle] = deque()
        self._running: list[FakeHandle] = []
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # ---- the contract ---------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False, suffix: Optional[str] = None) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if suffix is not None:
            return self.tokenizer.encode(f"{FIM_BEGIN}{prompt}{FIM_HOLE}{suffix}{FIM_END}")
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    def submit(self, prompt, params: SamplingParams = SamplingParams(), *, chat: bool = False,
               suffix: Optional[str] = None) -> FakeHandle:
        ids = self.encode(prompt, chat, suffix)
        if not ids:
            raise CacheLimitError("empty prompt")
        if len(ids) + params.max_new_tokens > self.plan.capacity:
            raise CacheLimitError(f"prompt of {len(ids)} tokens + max_new_tokens "
                                  f"{params.max_new_tokens} exceeds the maximum sequence "
                                  f"length {self.plan.capacity}")
        handle = FakeHandle(self, ids, params)
        with self._lock:
            if self.state != "ready":
                raise EngineClosedError(f"engine is {self.state}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests already waiting")
            self._waiting.append(handle)
            self.submitted.append(handle)
            self._lock.notify_all()
        return handle

    def health(self) -> dict:
        with self._lock:
            return {"state": self.state, "detail": self.detail,
                    "running": sum(h.params.n for h in self._running),
                    "waiting": sum(h.params.n for h in self._waiting), "slots": self.slots}

    def restart(self) -> None:
        if self.restart_failures > 0:
            self.restart_failures -= 1
            raise WorkerError("rank 0 failed to start (fake)")
        with self._lock:
            self.state, self.detail = "ready", ""
            self.restarts += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.state = "closed"
            self._lock.notify_all()
        self.gate.set()
        for h in self._drop_all():
            h._push(error=EngineClosedError("engine closed"))
        self._thread.join(5)

    # ---- test controls --------------------------------------------------------------------
    def fail(self, detail: str = "rank 0 exited unexpectedly (code -9)") -> None:
        """What a dead rank does to the real engine: every in-flight request errors."""
        with self._lock:
            self.state, self.detail = "failed", detail
        for h in self._drop_all():
            h._push(error=WorkerError(detail))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("FakeEngine.wait_until: condition not reached")
                self._lock.wait(left)

    # ---- the scheduler --------------------------------------------------------------------
    def _drop_all(self) -> list[FakeHandle]:
        with self._lock:
            handles = list(self._waiting) + self._running
            self._waiting.clear()
            self._running.clear()
            self._lock.notify_all()
        return handles

    def _withdraw(self, handle: FakeHandle) -> None:
        with self._lock:
            if handle in self._waiting:
                self._waiting.remove(handle)
            if handle in self._running:
                self._running.remove(handle)
            self._lock.notify_all()

    def _loop(self) -> None:
        while True:
            self.gate.wait()
            with self._lock:
                while not self._closed and not (self._waiting or self._running):
                    self._lock.wait()
                if self._closed:
                    return
                if not self.gate.is_set():  # held while it waited for work
                    continue
                free = self.slots - sum(h.params.n for h in self._running)
                while self._waiting and self._waiting[0].params.n <= free:
                    h = self._waiting.popleft()
                    free -= h.params.n
                    self._running.append(h)
                running = list(self._running)
            for h in running:
                self._step(h)
            with self._lock:
                self._running = [h for h in self._running
                                 if any(s.c.finish_reason is None for s in h.seqs)]
                self._lock.notify_all()
            if self.step_s:
                time.sleep(self.step_s)  # pacing of the fake "model", not synchronisation

    def _step(self, h: FakeHandle) -> None:
        p = h.params
        for s in h.seqs:
            if s.c.finish_reason is not None or h.cancelled:
                continue
            position = len(s.c.token_ids)
            tok = (fake_token(self.words, h.prompt_token_ids, position) if p.temperature == 0
                   else s.rng.choice(self.words))
            text = self.tokenizer.decode([tok])
            s.c.token_ids.append(tok)
            lps = None
            if p.logprobs is not None:
                top = [(t, -0.5 - k) for k, t in
                       enumerate(itertools.islice(itertools.cycle(self.words),
                                                  tok % 7, tok % 7 + p.logprobs))]
                lps = [TokenLogprob(tok, -0.25, top)]
                s.c.logprobs.extend(lps)
            if tok in p.stop_token_ids:
                s.c.finish_reason, text = "stop", ""
                s.c.token_ids.pop()
            else:
                s.c.text += text
                cut = min((i for i in (s.c.text.find(x) for x in p.stop) if i >= 0),
                          default=-1)
                if cut >= 0:
                    text = text[:max(0, len(text) - (len(s.c.text) - cut))]
                    s.c.text, s.c.finish_reason = s.c.text[:cut], "stop"
                elif len(s.c.token_ids) >= p.max_new_tokens:
                    s.c.finish_reason = "length"
            h._push(StreamEvent(s.c.index, text, [tok], lps,
                                s.c if s.c.finish_reason else None))
        if all(s.c.finish_reason for s in h.seqs):
            h._push(close=True)
