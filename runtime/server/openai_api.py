"""/v1/completions and /v1/chat/completions: a validated request becomes engine
submissions (prompts x n), then one JSON body or a stream of OpenAI chunks.

Generation never runs on the event loop: requests are submitted to the engine, whose
scheduler batches them, and their events are awaited. A client that stops reading
holds only its own coroutine (uvicorn's flow control); a client that disconnects, or
a request that outlives --request-timeout, cancels its sequences at once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import AsyncIterator, Optional, Union

from fastapi import Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from dsflow.runtime import SamplingParams
from dsflow.runtime.server.errors import ApiError, bad_request, from_exception
from dsflow.runtime.server.generation import Generation
from dsflow.runtime.server.http_io import ClientGone, EventStream, guarded, read_body
from dsflow.runtime.server.metrics import Metrics
from dsflow.runtime.server.responses import (ChunkWriter, LegacyLogprobs, chat_logprobs,
                                             completion_body, error_event, finish_reason, sse)
from dsflow.runtime.server.schemas import ChatRequest, CompletionRequest, validate
from dsflow.runtime.server.supervisor import Supervisor

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
AnyRequest = Union[CompletionRequest, ChatRequest]


@dataclass
class ServerOptions:
    model_name: str
    api_key: Optional[str] = None
    max_prompts: int = 16                  # sequences (prompts x n) one request may start
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: Optional[float] = 600.0


def max_model_len(engine) -> int:
    """Longest prompt + generation one sequence may have on this engine."""
    return engine.plan.capacity


class OpenAIApi:
    def __init__(self, engine, options: ServerOptions, supervisor: Supervisor,
                 metrics: Metrics):
        self.engine, self.options = engine, options
        self.supervisor, self.metrics = supervisor, metrics

    # ---- checks shared by the routes ------------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.options.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{self.options.model_name}'", param="model",
                           code="model_not_found")

    def limit_sequences(self, prompts: int, n: int) -> None:
        if prompts * n > self.options.max_prompts:
            raise bad_request(f"{prompts} prompt(s) x n={n} is over --max-prompts "
                              f"{self.options.max_prompts} sequences per request",
                              param="n" if n > 1 else "prompt")

    async def parse(self, request: Request, model: type) -> AnyRequest:
        req = validate(model, await read_body(request, self.options.max_body_bytes))
        self.check_model(req.model)
        return req

    # ---- the two routes -------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await self.parse(request, CompletionRequest)
        if req.echo and req.logprobs is not None:
            raise bad_request("'echo' with 'logprobs' is not supported (no prompt logprobs)",
                              param="echo")
        if req.suffix is not None and len(req.prompt) != 1:
            raise bad_request("'suffix' takes a single prompt", param="suffix")
        self.limit_sequences(len(req.prompt), req.n)
        params = self.sampling(req, req.max_tokens or DEFAULT_COMPLETION_TOKENS, req.logprobs)
        echo = None
        if req.echo:
            echo = [p if isinstance(p, str) else self.engine.tokenizer.decode(p)
                    for p in req.prompt]
        return await self.respond(request, req, list(req.prompt), params, suffix=req.suffix,
                                  echo=echo)

    async def chat(self, request: Request) -> Response:
        req = await self.parse(request, ChatRequest)
        self.limit_sequences(1, req.n)
        ids = await run_in_threadpool(self.chat_prompt, req)
        # OpenAI's default: the rest of the context
        limit = req.token_limit() or max(1, max_model_len(self.engine) - len(ids))
        top = (req.top_logprobs or 0) if req.logprobs else None
        return await self.respond(request, req, [ids], self.sampling(req, limit, top))

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        # "developer" is OpenAI's new name for the system role; templates know "system"
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]
        try:
            return self.engine.tokenizer.encode_messages(messages)
        except TemplateError as e:  # templates may refuse, e.g. roles out of order
            raise bad_request(f"the model's chat template cannot render these messages: {e}",
                              param="messages") from None

    def sampling(self, req: AnyRequest, max_tokens: int,
                 logprobs: Optional[int]) -> SamplingParams:
        """The request's settings over the engine's defaults (generation_config.json):
        what the client did not send keeps the model's default. max_tokens, not
        max_new_tokens: replace() re-runs the alias in SamplingParams.__post_init__."""
        given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                 "seed": req.seed}
        return replace(
            self.engine.default_params, max_tokens=max_tokens, n=req.n, logprobs=logprobs,
            stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos, **{k: v for k, v in given.items() if v is not None})

    # ---- answering --------------------------------------------------------------------------
    async def respond(self, request: Request, req: AnyRequest, prompts: list,
                      params: SamplingParams, suffix: Optional[str] = None,
                      echo: Optional[list[str]] = None) -> Response:
        chat = isinstance(req, ChatRequest)
        self.supervisor.admit()
        try:
            gen = await Generation.start(self.engine, prompts, params, self.metrics, suffix)
        except Exception as e:
            raise self.failure(e)
        logprobs = params.logprobs is not None
        timeout = self.options.request_timeout_s
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            writer = ChunkWriter(chat, self.options.model_name, include_usage)
            return EventStream(self.stream(gen, writer, echo, logprobs), timeout)
        try:
            body = await guarded(request, self.collect(gen, chat, echo, logprobs), timeout)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request", for the log
        except Exception as e:
            raise self.failure(e)
        return JSONResponse(body)

    def failure(self, e: Exception) -> ApiError:
        """The answer to an engine exception; a dead worker also wakes the supervisor."""
        err = from_exception(e)
        if err.code == "worker_failed":
            self.supervisor.notify_failure()
        return err

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def collect(self, gen: Generation, chat: bool, echo: Optional[list[str]],
                      logprobs: bool) -> dict:
        done = {}
        async for choice in gen.events():
            if choice.event.finished is not None:
                done[choice.index] = choice.event.finished
        choices = []
        for index in sorted(done):
            c = done[index]
            if chat:
                lp = chat_logprobs(c.logprobs, self.token_text) if logprobs else None
                body = {"message": {"role": "assistant", "content": c.text}}
            else:
                prefix = echo[index // gen.n] if echo else ""
                lp = (LegacyLogprobs(self.token_text, len(prefix)).format(c.logprobs)
                      if logprobs else None)
                body = {"text": prefix + c.text}
            choices.append({"index": index, **body, "logprobs": lp,
                            "finish_reason": finish_reason(c.finish_reason),
                            "token_ids": c.token_ids})
        return completion_body(chat, self.options.model_name, choices, gen.prompt_token_ids,
                               sum(len(c.token_ids) for c in done.values()))

    async def stream(self, gen: Generation, writer: ChunkWriter, echo: Optional[list[str]],
                     logprobs: bool) -> AsyncIterator[bytes]:
        offsets: dict[int, LegacyLogprobs] = {}  # per choice; text_offset runs on
        produced = 0
        try:
            async for choice in gen.events():
                ev, i = choice.event, choice.index
                produced += len(ev.token_ids)
                text = ev.text
                if i not in offsets:  # the choice's first chunk carries the echo
                    text = (echo[i // gen.n] if echo else "") + text
                    offsets[i] = LegacyLogprobs(self.token_text, len(text) - len(ev.text))
                lp = None
                if logprobs and ev.logprobs is not None:
                    lp = (chat_logprobs(ev.logprobs, self.token_text) if writer.chat
                          else offsets[i].format(ev.logprobs))
                yield writer.text(i, text, ev.token_ids, lp,
                                  ev.finished.finish_reason if ev.finished else None)
            if writer.include_usage:
                yield writer.usage(gen.prompt_token_ids, produced)
            yield sse("[DONE]")
        except Exception as e:  # the status is sent: the error goes in the stream
            yield error_event(self.failure(e).body())
