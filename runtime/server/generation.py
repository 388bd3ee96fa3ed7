"""One API request on the engine: its prompts x n sequences as one stream of events.

OpenAI numbers the choices of a request prompt-major (choice = prompt * n + sample);
each prompt is one engine submission carrying n samples that share its prefill.
Everything here awaits the engine without blocking the event loop, and every way out
(finished, error, timeout, client gone) cancels what is still running, so a sequence
never outlives the request that asked for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence, Union

from starlette.concurrency import run_in_threadpool

from dsflow.runtime import RequestHandle, SamplingParams, StreamEvent
from dsflow.runtime.server.metrics import Metrics

Prompt = Union[str, Sequence[int]]


@dataclass
class Choice:
    """An event of one choice of the request, with the request-wide choice index."""
    index: int
    event: StreamEvent


@dataclass
class Generation:
    """One engine submission of the request's prompts; its handle is the one buffer
    between the engine and this request's response (runtime/outputs.py Collector),
    numbering choices prompt * n + sample as OpenAI does."""
    handle: RequestHandle
    n: int
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    async def start(cls, engine, prompts: Sequence[Prompt], params: SamplingParams,
                    metrics: Metrics, suffix: Optional[str] = None) -> "Generation":
        """Submit every prompt, all or none (submit_many tokenizes: off the event loop)."""
        handle = await run_in_threadpool(
            lambda: engine.submit_many(list(prompts), params, suffix=suffix))
        metrics.prompt_tokens.inc(sum(len(p) for p in handle.prompts))
        return cls(handle, params.n, metrics)

    @property
    def prompt_token_ids(self) -> list[list[int]]:
        return self.handle.prompts

    def cancel(self) -> None:
        self.handle.cancel()

    async def events(self) -> AsyncIterator[Choice]:
        """Events of every choice as they come; engine errors are raised here."""
        last: dict[int, float] = {}
        try:
            async for event in self.handle:
                choice = Choice(event.index, event)
                self._observe(choice, last)
                yield choice
        finally:
            self.cancel()

    def _observe(self, choice: Choice, last: dict[int, float]) -> None:
        """Time to first token and inter-token latency, per choice."""
        count = len(choice.event.token_ids)
        if not count:
            return
        now = time.perf_counter()
        if choice.index in last:
            gap = (now - last[choice.index]) / count
            for _ in range(count):
                self.metrics.inter_token_latency.observe(gap)
        else:
            self.metrics.time_to_first_token.observe(now - self.started)
        last[choice.index] = now
        self.metrics.generation_tokens.inc(count)
