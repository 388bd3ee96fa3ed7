"""An HTTP server for embedding dsflow in services: OpenAI-style completions, stdlib only.

    dsserve --artifacts dsflow-artifacts --port 8000
    curl -s localhost:8000/v1/completions -d '{"prompt": "def fib(n):", "max_tokens": 32}'

Endpoints: GET /health, POST /v1/completions, POST /v1/chat/completions (both with
"stream": true for server-sent events). The engine runs one batch at a time, so
concurrent requests queue; a request's list of prompts is one batch. Binds to
127.0.0.1 unless told otherwise: there is no authentication.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from dsflow.common.errors import DsflowError
from dsflow.runtime.engine import Completion, Engine
from dsflow.runtime.protocol import WorkerError
from dsflow.runtime.sampling import SamplingParams

log = logging.getLogger("dsflow.server")
MAX_BODY = 4 * 1024 * 1024


class BadRequest(DsflowError):
    pass


def sampling_from_request(body: dict) -> SamplingParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    try:
        params = SamplingParams(
            max_new_tokens=int(body.get("max_tokens", 128)),
            temperature=float(body.get("temperature", 0.0)),
            top_k=int(body.get("top_k", 0)), top_p=float(body.get("top_p", 1.0)),
            seed=None if body.get("seed") is None else int(body["seed"]),
            stop=tuple(str(s) for s in stop), ignore_eos=bool(body.get("ignore_eos", False)))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad sampling parameter: {e}") from None
    params.check()
    return params


def prompts_from_request(body: dict, engine: Engine, chat: bool) -> list:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        text = engine.tokenizer.apply_chat_template(messages)
        return [engine.tokenizer.encode(text, add_bos=False)]
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    raise BadRequest("'prompt' must be a string, a list of strings, or a list of token ids")


def _choice(c: Completion, chat: bool) -> dict:
    body = {"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text}
    return {"index": c.index, **body, "finish_reason": c.finish_reason,
            "token_ids": c.token_ids}


class Handler(BaseHTTPRequestHandler):
    server_version = "dsflow"
    engine: Engine  # set on the class by make_server
    model_name = "dsflow"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    # ---- plumbing ------------------------------------------------------------
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": {"message": message, "code": status}})

    def _read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    # ---- routes ------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path != "/health":
            return self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        m = self.engine.manifest
        self._send_json(HTTPStatus.OK, {"status": "ok", "tp": m.tp, "target": m.target,
                                        "max_seq_len": m.max_seq_len})

    def do_POST(self) -> None:
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if self.path not in routes:
            return self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        chat = routes[self.path]
        try:
            body = self._read_body()
            params = sampling_from_request(body)
            prompts = prompts_from_request(body, self.engine, chat)
            if body.get("stream"):
                return self._stream(prompts, params, chat)
            results = self.engine.generate(prompts, params)
        except WorkerError as e:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        except DsflowError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        self._send_json(HTTPStatus.OK, {
            "id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "object": "chat.completion" if chat else "text_completion",
            "model": self.model_name, "choices": [_choice(c, chat) for c in results],
            "usage": {"prompt_tokens": sum(len(c.prompt_token_ids) for c in results),
                      "completion_tokens": sum(len(c.token_ids) for c in results)}})

    def _stream(self, prompts: list, params: SamplingParams, chat: bool) -> None:
        events = self.engine.stream(prompts, params)
        first = next(events)  # errors before any byte is sent still become a 400/503
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        rid = f"cmpl-{uuid.uuid4().hex}"
        try:
            for ev in _chain(first, events):
                delta = {"delta": {"content": ev.text}} if chat else {"text": ev.text}
                chunk = {"id": rid, "object": "chat.completion.chunk" if chat
                         else "text_completion", "model": self.model_name,
                         "choices": [{"index": ev.index, **delta, "finish_reason":
                                      ev.finished.finish_reason if ev.finished else None}]}
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            events.close()  # client went away: stop generating


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                model_name: Optional[str] = None) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"engine": engine,
                                                "model_name": model_name or "dsflow"})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
