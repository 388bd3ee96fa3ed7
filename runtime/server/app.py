"""The routes: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Generation never runs on the event loop: requests are submitted to the engine, whose
scheduler batches them, and their events are awaited. A client that stops reading
holds only its own coroutine (uvicorn's flow control); a client that disconnects, or
a request that outlives --request-timeout, cancels its sequences at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Optional, TypeVar, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsflow.graphs.errors import DsflowError
from dsflow.runtime import SamplingParams

from .access import AccessLog
from .errors import ApiError, bad_request, from_exception
from .generation import Generation
from .metrics import CONTENT_TYPE, Metrics
from .responses import (ChunkWriter, LegacyLogprobs, chat_logprobs, completion_body,
                        error_event, finish_reason, sse)
from .schemas import ChatRequest, CompletionRequest, parse_json_object, validate
from .supervisor import Supervisor

log = logging.getLogger("dsflow.server")
T = TypeVar("T")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerOptions:
    model_name: str
    api_key: Optional[str] = None
    max_prompts: int = 16                  # sequences (prompts x n) one request may start
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: Optional[float] = 600.0


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ---- request plumbing ---------------------------------------------------------------------
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


# ---- the app ----------------------------------------------------------------------------
def create_app(engine, options: ServerOptions, supervisor: Supervisor,
               metrics: Metrics) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watch = asyncio.create_task(supervisor.run())
        yield
        watch.cancel()

    app = FastAPI(title="dsserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(AccessLog, metrics=metrics)
    created = int(time.time())
    max_seq_len = engine.manifest.max_seq_len

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        body = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        code=kind).body()
        return JSONResponse(body, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(DsflowError)
    async def dsflow_error(request: Request, e: DsflowError) -> JSONResponse:
        return await api_error(request, from_exception(e))

    @app.exception_handler(Exception)  # a bug: logged with its traceback, answered 500
    async def any_error(request: Request, e: Exception) -> JSONResponse:
        return await api_error(request, from_exception(e))

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                 options.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_card() -> dict:
        return {"id": options.model_name, "object": "model", "created": created,
                "owned_by": "dsflow", "max_model_len": max_seq_len}

    # ---- operations -----------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        engine_health: dict = {}
        if supervisor.state == "ready":
            engine_health = await run_in_threadpool(engine.health)
            if engine_health.get("state") == "failed":
                supervisor.notify_failure()
        ok = supervisor.state == "ready" and engine_health.get("state") == "ready"
        status = "ok" if ok else (supervisor.state if supervisor.state != "ready"
                                  else engine_health.get("state", "unknown"))
        return JSONResponse({"status": status, "model": options.model_name,
                             "detail": supervisor.detail or engine_health.get("detail", ""),
                             "engine": engine_health}, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await run_in_threadpool(metrics.exposition), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict:
        authorize(request)
        check_model(model)
        return model_card()

    def check_model(model: Optional[str]) -> None:
        if model is not None and model != options.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{options.model_name}'", param="model", code="model_not_found")

    # ---- generation -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = validate(CompletionRequest, await read_body(request, options.max_body_bytes))
        check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise bad_request("'echo' with 'logprobs' is not supported (no prompt logprobs)",
                              param="echo")
        if req.suffix is not None and len(req.prompt) != 1:
            raise bad_request("'suffix' takes a single prompt", param="suffix")
        limit_sequences(len(req.prompt), req.n)
        params = sampling(req, req.max_tokens or DEFAULT_COMPLETION_TOKENS, req.logprobs)
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in req.prompt] \
            if req.echo else None
        return await respond(request, req, list(req.prompt), params, chat=False,
                             suffix=req.suffix, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = validate(ChatRequest, await read_body(request, options.max_body_bytes))
        check_model(req.model)
        limit_sequences(1, req.n)
        ids = await run_in_threadpool(chat_prompt, req)
        limit = req.token_limit() or max(1, max_seq_len - len(ids))  # OpenAI: the rest
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await respond(request, req, [ids], sampling(req, limit, top), chat=True)

    def chat_prompt(req: ChatRequest) -> list[int]:
        # "developer" is OpenAI's new name for the system role; templates know "system"
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]
        text = engine.tokenizer.apply_chat_template(messages)
        return engine.tokenizer.encode(text, add_bos=False)  # the template has the BOS

    def limit_sequences(prompts: int, n: int) -> None:
        if prompts * n > options.max_prompts:
            raise bad_request(f"{prompts} prompt(s) x n={n} is over --max-prompts "
                              f"{options.max_prompts} sequences per request",
                              param="n" if n > 1 else "prompt")

    def sampling(req: Union[CompletionRequest, ChatRequest], max_tokens: int,
                 logprobs: Optional[int]) -> SamplingParams:
        """The request's settings over the engine's defaults (generation_config.json):
        what the client did not send keeps the model's default. max_tokens, not
        max_new_tokens: replace() re-runs the alias in SamplingParams.__post_init__."""
        given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                 "seed": req.seed}
        return replace(
            engine.default_params, max_tokens=max_tokens, n=req.n, logprobs=logprobs,
            stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos, **{k: v for k, v in given.items() if v is not None})

    async def respond(request: Request, req, prompts: list, params: SamplingParams,
                      chat: bool, suffix: Optional[str] = None,
                      echo: Optional[list[str]] = None) -> Response:
        supervisor.admit()
        try:
            gen = await Generation.start(engine, prompts, params, metrics, suffix)
        except Exception as e:
            raise note_failure(e)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            writer = ChunkWriter(chat, options.model_name, include_usage)
            return EventStream(stream(gen, writer, echo, params.logprobs is not None),
                               options.request_timeout_s)
        try:
            body = await guarded(request, collect(gen, chat, echo, params.logprobs is not None),
                                 options.request_timeout_s)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request", for the log
        except Exception as e:
            raise note_failure(e)
        return JSONResponse(body)

    def note_failure(e: Exception) -> ApiError:
        err = from_exception(e)
        if err.code == "worker_failed":
            supervisor.notify_failure()
        return err

    def token_text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id])

    async def collect(gen: Generation, chat: bool, echo: Optional[list[str]],
                      logprobs: bool) -> dict:
        done = {}
        async for choice in gen.events():
            if choice.event.finished is not None:
                done[choice.index] = choice.event.finished
        choices = []
        for index in sorted(done):
            c = done[index]
            reason = finish_reason(c.finish_reason)
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": chat_logprobs(c.logprobs, token_text)
                                if logprobs else None,
                                "finish_reason": reason, "token_ids": c.token_ids})
                continue
            prefix = echo[index // gen.n] if echo else ""
            lp = LegacyLogprobs(token_text, len(prefix)).format(c.logprobs) if logprobs else None
            choices.append({"index": index, "text": prefix + c.text, "logprobs": lp,
                            "finish_reason": reason, "token_ids": c.token_ids})
        return completion_body(chat, options.model_name, choices, gen.prompt_token_ids,
                               sum(len(c.token_ids) for c in done.values()))

    async def stream(gen: Generation, writer: ChunkWriter, echo: Optional[list[str]],
                     logprobs: bool) -> AsyncIterator[bytes]:
        started: set[int] = set()
        offsets: dict[int, LegacyLogprobs] = {}  # text_offset runs on across chunks
        produced = 0
        try:
            async for choice in gen.events():
                ev, i = choice.event, choice.index
                produced += len(ev.token_ids)
                text = ev.text
                if i not in started:
                    started.add(i)
                    text = (echo[i // gen.n] if echo else "") + text
                    offsets[i] = LegacyLogprobs(token_text, len(text) - len(ev.text))
                lp = None
                if logprobs and ev.logprobs is not None:
                    lp = (chat_logprobs(ev.logprobs, token_text) if writer.chat
                          else offsets[i].format(ev.logprobs))
                yield writer.text(i, text, ev.token_ids, lp,
                                  ev.finished.finish_reason if ev.finished else None)
            if writer.include_usage:
                yield writer.usage(gen.prompt_token_ids, produced)
            yield sse("[DONE]")
        except Exception as e:  # the status is sent: the error goes in the stream
            yield error_event(note_failure(e).body())

    return app
