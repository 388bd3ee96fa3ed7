"""What a caller holds while the engine works: completions, stream events and the
request handle (blocking and asyncio iteration, cancel, result).

The engine thread pushes events into a handle; callers in any thread (or an asyncio
loop) read them. A handle never blocks the engine: its event list only grows.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Optional, Union

from dsflow.common.errors import DsflowError
from dsflow.runtime.sampling import SamplingParams, TokenLogprob
from dsflow.runtime.tokenizer import IncrementalDecoder, Tokenizer


class QueueFullError(DsflowError):
    """The engine's bounded queue of waiting requests is full; try again later."""


class EngineClosedError(DsflowError):
    """The engine was closed, or failed and was not restarted."""


@dataclass
class Completion:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length" or "cancelled"
    logprobs: Optional[list[TokenLogprob]] = None
    prefill_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    time_to_first_token_ms: float = 0.0

    def to_dict(self) -> dict:
        d = {"index": self.index, "prompt_token_ids": self.prompt_token_ids,
             "token_ids": self.token_ids, "text": self.text,
             "finish_reason": self.finish_reason,
             "timings": {"prefill_ms": round(self.prefill_ms, 3),
                         "decode_ms_per_token": round(self.decode_ms_per_token, 3),
                         "time_to_first_token_ms": round(self.time_to_first_token_ms, 3)}}
        if self.logprobs is not None:
            d["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        return d


@dataclass
class StreamEvent:
    """New text of one completion; `finished` is set on its last event."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None
    finished: Optional[Completion] = None


class _SequenceState:
    """Per-sequence bookkeeping: stop conditions and stop-string-safe streaming."""

    def __init__(self, completion: Completion, tokenizer: Tokenizer, params: SamplingParams,
                 eos_ids: Optional[frozenset] = None):
        self.c = completion
        self.params = params
        eos = tokenizer.eos_ids if eos_ids is None else eos_ids
        self.eos = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                       else eos)
        self.detok = IncrementalDecoder(tokenizer)
        self.emitted = 0  # characters of c.text already streamed
        self.holdback = max((len(s) for s in params.stop), default=0)
        if params.logprobs is not None:
            self.c.logprobs = []

    @property
    def done(self) -> bool:
        return self.c.finish_reason is not None

    def add(self, token: int, logprob: Optional[TokenLogprob] = None) -> str:
        """Record one token; return the text that can be streamed now."""
        self.c.token_ids.append(token)
        if self.c.logprobs is not None and logprob is not None:
            self.c.logprobs.append(logprob)
        if token in self.eos:
            self.c.token_ids.pop()  # stop token: not part of the output
            if self.c.logprobs:
                self.c.logprobs.pop()
            self.c.finish_reason = "stop"
            self.c.text += self.detok.flush()
            return self._release(final=True)
        self.c.text += self.detok.push(token)
        if self._cut_at_stop_string():
            return self._release(final=True)
        if len(self.c.token_ids) >= self.params.max_new_tokens:
            self.c.finish_reason = "length"
            self.c.text += self.detok.flush()
            self._cut_at_stop_string()
            return self._release(final=True)
        return self._release(final=False)

    def cancel(self) -> str:
        self.c.finish_reason = "cancelled"
        self.c.text += self.detok.flush()
        return self._release(final=True)

    def _cut_at_stop_string(self) -> bool:
        start = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.c.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.c.text = self.c.text[:min(hits)]
        self.c.finish_reason = "stop"
        return True

    def _release(self, final: bool) -> str:
        """Text not yet streamed, minus a tail that could still become a stop string."""
        end = len(self.c.text)
        if not final and self.params.stop:
            for k in range(min(self.holdback - 1, end), 0, -1):
                tail = self.c.text[end - k:]
                if any(s.startswith(tail) for s in self.params.stop):
                    end -= k
                    break
        out = self.c.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


Item = Union[StreamEvent, BaseException]


class RequestHandle:
    """One submitted prompt and its n completions, as they are generated."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], n: int,
                 on_cancel: Callable[["RequestHandle"], None]):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.n = n
        self.cancelled = False
        self._on_cancel = on_cancel
        self._items: list[Item] = []
        self._completions: list[Optional[Completion]] = [None] * n
        self._cond = threading.Condition()
        self._listeners: list[Callable[[Item], None]] = []

    # ---- engine side ---------------------------------------------------------------
    def _push(self, item: Item) -> None:
        with self._cond:
            if self.finished:
                return
            self._items.append(item)
            if isinstance(item, StreamEvent) and item.finished is not None:
                self._completions[item.index] = item.finished
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(item)

    @property
    def finished(self) -> bool:
        """Every completion is done, or the request failed."""
        return (all(c is not None for c in self._completions)
                or any(isinstance(i, BaseException) for i in self._items))

    # ---- caller side ---------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating; the slots are freed at the next step. Idempotent."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            self._on_cancel(self)

    def subscribe(self, listener: Callable[[Item], None]) -> None:
        """Call `listener` (from the engine thread) with every item, past ones first."""
        with self._cond:
            past = list(self._items)
            self._listeners.append(listener)
        for item in past:
            listener(item)

    def __iter__(self) -> Iterator[StreamEvent]:
        """Events as they come (blocking); raises the engine's error if it fails.
        Leaving the loop early cancels the request."""
        i = 0
        try:
            while True:
                with self._cond:
                    while i >= len(self._items):
                        if self.finished:
                            return
                        self._cond.wait()
                    item = self._items[i]
                i += 1
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.finished:
                self.cancel()

    async def _aiter(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribe(lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        done = 0
        try:
            while done < self.n:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done += item.finished is not None
                yield item
        finally:
            if not self.finished:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        """The same events for asyncio: never blocks the event loop."""
        return self._aiter()

    def result(self, timeout: Optional[float] = None) -> list[Completion]:
        """All n completions, by index (waits for them)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            for item in self._items:
                if isinstance(item, BaseException):
                    raise item
            return list(self._completions)
