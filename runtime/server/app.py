"""The FastAPI app: routes, authentication, error handlers, the supervisor's task.

    GET  /v1/models, /v1/models/{id}     the served model
    POST /v1/completions                 openai_api.OpenAIApi.completions
    POST /v1/chat/completions            openai_api.OpenAIApi.chat
    GET  /health                         200 only while the engine really serves
    GET  /metrics                        Prometheus text
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsflow.common.errors import DsflowError
from dsflow.runtime.server.access import AccessLog
from dsflow.runtime.server.errors import ApiError, from_exception
from dsflow.runtime.server.metrics import CONTENT_TYPE, Metrics
from dsflow.runtime.server.openai_api import OpenAIApi, ServerOptions, max_model_len
from dsflow.runtime.server.supervisor import Supervisor


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        body = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                        code=code).body()
        return JSONResponse(body, e.status_code, headers=getattr(e, "headers", None))

    async def mapped(request: Request, e: Exception) -> JSONResponse:
        # DsflowError: the caller's input; Exception: a bug, logged with its traceback
        return await api_error(request, from_exception(e))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(DsflowError, mapped)
    app.add_exception_handler(Exception, mapped)


def authorizer(api_key):
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return authorize


def create_app(engine, options: ServerOptions, supervisor: Supervisor,
               metrics: Metrics) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watch = asyncio.create_task(supervisor.run())
        yield
        watch.cancel()

    app = FastAPI(title="dsserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(AccessLog, metrics=metrics)
    _add_error_handlers(app)
    api = OpenAIApi(engine, options, supervisor, metrics)
    authorize = authorizer(options.api_key)
    card = {"id": options.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "dsflow", "max_model_len": max_model_len(engine)}

    @app.get("/health")
    async def health() -> JSONResponse:
        engine_health: dict = {}
        if supervisor.state == "ready":
            engine_health = await supervisor.engine_health()
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
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict:
        authorize(request)
        api.check_model(model)
        return card

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        return await api.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        return await api.chat(request)

    return app
