"""One API request on the engine: its prompts x n sequences as one stream of events.

OpenAI numbers the choices of a request prompt-major (choice = prompt * n + sample);
each prompt is one engine submission carrying n samples that share its prefill.
Everything here awaits the engine without blocking the event loop, and every way out
(finished, error, timeout, client gone) cancels what is still running, so a sequence
never outlives the request that asked for it.
"""
from __future__ import annotations

import asyncio
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
    handles: list[RequestHandle]
    n: int
    metrics: Metrics
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    async def start(cls, engine, prompts: Sequence[Prompt], params: SamplingParams,
                    metrics: Metrics, suffix: Optional[str] = None) -> "Generation":
        """Submit every prompt; if one is refused, withdraw the ones already queued."""
        handles: list[RequestHandle] = []
        try:
            for prompt in prompts:
                # submit tokenizes: off the event loop
                handles.append(await run_in_threadpool(
                    lambda p=prompt: engine.submit(p, params, suffix=suffix)))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        metrics.prompt_tokens.inc(sum(len(h.prompt_token_ids) for h in handles))
        return cls(handles, params.n, metrics)

    @property
    def prompt_token_ids(self) -> list[list[int]]:
        return [h.prompt_token_ids for h in self.handles]

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[Choice]:
        """Events of all handles as they come; engine errors are raised here."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, handle: RequestHandle) -> None:
            try:
                async for event in handle:
                    await queue.put(Choice(p * self.n + event.index, event))
                await queue.put(None)
            except Exception as e:  # handed to the consumer, which raises it
                await queue.put(e)

        tasks = [asyncio.create_task(pump(p, h)) for p, h in enumerate(self.handles)]
        last: dict[int, float] = {}
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                self._observe(item, last)
                yield item
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

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
