"""The output processor, on the caller's side: what a caller holds while the engine works.

The engine thread only pushes token ids into a request's `Collector` (`push`: a few
list appends, never text). The caller's thread (or asyncio loop) turns them into
text when it reads: incremental detokenization, stop strings (a hit aborts that
sequence in the engine), timings. The collector is the one buffer between the engine
and a consumer: per sequence it holds what the consumer has not read yet, merged, so a
consumer that lags gets one event with several tokens instead of a growing queue.

One collector serves one submission of several prompts x n samples (the fan-in):
sequence i of prompt p is choice p * n + i, as OpenAI numbers choices; `Engine.stream`,
`Engine.generate` and the server's completions all read it the same way.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Optional

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
    """New text of one completion (one or more tokens); `finished` is set on its last."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None
    finished: Optional[Completion] = None


@dataclass
class TokenDelta:
    """What the engine pushed for one sequence since the consumer last read it."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Optional[TokenLogprob]] = field(default_factory=list)
    finish: Optional[str] = None
    stop_token: bool = False      # the last token is a stop token (not output)
    t_last: float = 0.0           # perf_counter of the last token
    first: Optional[dict] = None  # timings of the first token


class SequenceText:
    """One sequence's text: incremental detokenization, stop strings, and the text that
    can be streamed (a tail that could still become a stop string is held back)."""

    def __init__(self, completion: Completion, tokenizer: Tokenizer, params: SamplingParams):
        self.c = completion
        self.params = params
        self.detok = IncrementalDecoder(tokenizer)
        self.emitted = 0  # characters of c.text already released
        self.holdback = max((len(s) for s in params.stop), default=0)
        self.t_first = 0.0
        if params.logprobs is not None:
            self.c.logprobs = []

    @property
    def done(self) -> bool:
        return self.c.finish_reason is not None

    def add(self, token: int, logprob: Optional[TokenLogprob], finish: Optional[str]) -> None:
        """One output token; `finish` if the engine ended the sequence with it."""
        self.c.token_ids.append(token)
        if self.c.logprobs is not None and logprob is not None:
            self.c.logprobs.append(logprob)
        self.c.text += self.detok.push(token)
        if self._cut_at_stop_string():
            return
        if finish is not None:
            self.end(finish)

    def end(self, finish: str) -> None:
        self.c.text += self.detok.flush()
        if not self._cut_at_stop_string():
            self.c.finish_reason = finish

    def _cut_at_stop_string(self) -> bool:
        start = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.c.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.c.text = self.c.text[:min(hits)]
        self.c.finish_reason = "stop"
        return True

    def release(self) -> str:
        """Text not yet released, minus a tail that could still become a stop string."""
        end = len(self.c.text)
        if not self.done and self.params.stop:
            for k in range(min(self.holdback - 1, end), 0, -1):
                tail = self.c.text[end - k:]
                if any(s.startswith(tail) for s in self.params.stop):
                    end -= k
                    break
        out = self.c.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


@dataclass
class _Unread:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False


class Collector:
    """The buffer of one submission (prompts x n sequences) between the engine thread
    (`push`, `fail`) and one consumer (`events`, `result`)."""

    def __init__(self, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams,
                 abort: Callable[[int], None]):
        """abort(index): end that sequence in the engine (a stop string, a cancel)."""
        self.params, self.n = params, params.n
        self.size = len(prompts) * params.n
        self._abort = abort
        self._seqs = [SequenceText(Completion(i, list(prompts[i // params.n])), tokenizer,
                                   params) for i in range(self.size)]
        self._pending: dict[int, TokenDelta] = {}  # engine side, not yet processed
        self._unread: dict[int, _Unread] = {}      # processed, not yet read
        self._read_done: set[int] = set()
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._processing = threading.Lock()  # result() and an iterator may both process
        self._wakers: list[Callable[[], None]] = []

    # ---- the engine thread ---------------------------------------------------------------
    def push(self, index: int, token: int, logprob: Optional[TokenLogprob],
             finish: Optional[str], stop_token: bool, t: float,
             first: Optional[dict] = None) -> None:
        with self._cond:
            d = self._pending.setdefault(index, TokenDelta())
            d.tokens.append(token)
            d.logprobs.append(logprob)
            d.finish, d.stop_token, d.t_last = finish, stop_token, t
            d.first = d.first or first
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def end(self, index: int, finish: str, t: float) -> None:
        """A sequence ended without a token (cancelled)."""
        with self._cond:
            d = self._pending.setdefault(index, TokenDelta())
            d.finish, d.t_last = d.finish or finish, t
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # ---- the consumer ----------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Every sequence is done (processed or pending), or the request failed."""
        with self._cond:
            return self._error is not None or all(
                s.done or (i in self._pending and self._pending[i].finish)
                for i, s in enumerate(self._seqs))

    def _process(self) -> None:
        """Turn what the engine pushed into text (the caller's thread, not the engine's)."""
        with self._processing:
            self._process_locked()

    def _process_locked(self) -> None:
        with self._cond:
            pending, self._pending = self._pending, {}
        for index, d in sorted(pending.items()):
            s = self._seqs[index]
            if s.done:
                continue
            if d.first:
                s.t_first = d.first["t"]
                s.c.prefill_ms = d.first["prefill_ms"]
                s.c.time_to_first_token_ms = d.first["ttft_ms"]
            out = self._unread.setdefault(index, _Unread())
            for k, (token, lp) in enumerate(zip(d.tokens, d.logprobs)):
                last = k == len(d.tokens) - 1
                if last and d.stop_token:
                    s.end("stop")
                    break
                s.add(token, lp, d.finish if last else None)
                out.tokens.append(token)
                if lp is not None:
                    out.logprobs.append(lp)
                if s.done:
                    break
            if not s.done and d.finish:
                s.end(d.finish)
            if s.done:
                if s.t_first:
                    s.c.decode_ms_per_token = ((d.t_last - s.t_first) * 1e3
                                               / max(len(s.c.token_ids) - 1, 1))
                if d.finish is None:  # a stop string: the engine has not ended it yet
                    self._abort(index)
            out.text += s.release()
            out.finished = s.done

    def _take(self) -> list[StreamEvent]:
        events = []
        for index, u in sorted(self._unread.items()):
            s = self._seqs[index]
            events.append(StreamEvent(index, u.text, u.tokens,
                                      u.logprobs if s.c.logprobs is not None else None,
                                      s.c if u.finished else None))
            if u.finished:
                self._read_done.add(index)
        self._unread.clear()
        return events

    def _poll(self) -> tuple[bool, list[StreamEvent]]:
        """(over, events): what can be read now; raises the engine's error."""
        with self._processing:
            self._process_locked()
            events = self._take()
        if events:
            return False, events
        with self._cond:
            if self._error is not None:
                raise self._error
            if not self._pending and len(self._read_done) == self.size:
                return True, []
        return False, []

    def events(self) -> Iterator[StreamEvent]:
        while True:
            over, events = self._poll()
            if over:
                return
            if not events:
                with self._cond:
                    if not self._pending and self._error is None:
                        self._cond.wait()
                continue
            yield from events

    async def aevents(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()

        def waker() -> None:
            loop.call_soon_threadsafe(flag.set)
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                flag.clear()
                over, events = self._poll()
                if over:
                    return
                if not events:
                    await flag.wait()
                    continue
                for e in events:
                    yield e
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def result(self, timeout: Optional[float]) -> list[Completion]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._error is not None or all(
                    s.done or (i in self._pending and self._pending[i].finish)
                    for i, s in enumerate(self._seqs)), timeout):
                return None
            if self._error is not None:
                raise self._error
        # processed here, the text stays unread for an iterator that is still reading
        self._process()
        return [s.c for s in self._seqs]


class RequestHandle:
    """One submission (a prompt, or several) and its completions, as they are generated:
    blocking and asyncio iteration, cancel, result. One consumer at a time."""

    def __init__(self, request_ids: list[str], prompts: list[list[int]], n: int,
                 collector: Collector, on_cancel: Callable[["RequestHandle"], None]):
        self.request_id = request_ids[0]
        self.request_ids = request_ids
        self.prompts = prompts
        self.prompt_token_ids = prompts[0]
        self.n = n
        self.cancelled = False
        self._collector = collector
        self._on_cancel = on_cancel

    @property
    def finished(self) -> bool:
        return self._collector.finished

    def cancel(self) -> None:
        """Stop generating; the slots are freed at the next step. Idempotent."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            self._on_cancel(self)

    def __iter__(self) -> Iterator[StreamEvent]:
        """Events as they come (blocking); raises the engine's error if it fails.
        Leaving the loop early cancels the request."""
        try:
            yield from self._collector.events()
        finally:
            if not self.finished:
                self.cancel()

    async def _aiter(self) -> AsyncIterator[StreamEvent]:
        try:
            async for e in self._collector.aevents():
                yield e
        finally:
            if not self.finished:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        """The same events for asyncio: never blocks the event loop."""
        return self._aiter()

    def result(self, timeout: Optional[float] = None) -> list[Completion]:
        """All completions, by index (waits for them)."""
        done = self._collector.result(timeout)
        if done is None:
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return done
