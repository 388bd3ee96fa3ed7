"""HTTP plumbing under the routes: bounded body reading, and waiting on generation
while watching for the client leaving or the request timing out (either cancels the
generation, whose `finally` blocks cancel the engine sequences)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Optional, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from dsflow.runtime.server.errors import ApiError
from dsflow.runtime.server.responses import error_event
from dsflow.runtime.server.schemas import parse_json_object

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def read_body(request: Request, limit: int) -> dict:
    """The JSON body, refusing oversized ones before and while reading them."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def guarded(request: Request, work: Awaitable[T], timeout: Optional[float]) -> T:
    """Await `work` unless the client leaves or the time runs out; then cancel it (its
    `finally` blocks cancel the engine sequences)."""
    work_task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({work_task, gone}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if work_task in done:
        return work_task.result()
    work_task.cancel()
    await asyncio.gather(work_task, return_exceptions=True)
    if gone in done:
        raise ClientGone()
    raise timeout_error(timeout)


def timeout_error(timeout: Optional[float]) -> ApiError:
    return ApiError(504, f"request took longer than --request-timeout {timeout:g} s; cancelled",
                    type="timeout_error", code="request_timeout")


class EventStream(StreamingResponse):
    """Server-sent events that stop, and cancel the generation, as soon as the client
    disconnects or the request times out. Starlette's StreamingResponse under ASGI 2.4
    notices a disconnect only when a write fails, which for a request still waiting in
    the engine's queue may be minutes later."""

    def __init__(self, events: AsyncIterator[bytes], timeout: Optional[float]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        finished = False
        with anyio.move_on_after(self.timeout) as deadline:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    nonlocal finished
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    finished = True
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        await self.body_iterator.aclose()  # runs the generator's finally: cancels sequences
        if deadline.cancelled_caught and not finished:
            with anyio.move_on_after(1.0), contextlib.suppress(OSError):
                await send({"type": "http.response.body", "more_body": False,
                            "body": error_event(timeout_error(self.timeout).body())})
