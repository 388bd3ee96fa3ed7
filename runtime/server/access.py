"""Access log lines through `logging` ("dsflow.server.access") and the per-route
request counters, as plain ASGI middleware: Starlette's BaseHTTPMiddleware would sit
between a streaming response and the client and hide disconnects."""
from __future__ import annotations

import logging
import time

from dsflow.runtime.server.metrics import Metrics

log = logging.getLogger("dsflow.server.access")

ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions",
                    "/v1/chat/completions"})


class AccessLog:
    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            path = scope["path"]
            route = path if path in ROUTES else "/v1/models/{model}" \
                if path.startswith("/v1/models/") else "other"  # bounded label values
            # 499: the client left before any answer (nginx's convention)
            self.metrics.requests.labels(route, str(status or 499)).inc()
            self.metrics.request_duration.observe(elapsed)
            client = scope.get("client") or ("-", 0)
            log.info('%s:%s "%s %s" %s %.3fs', client[0], client[1], scope["method"], path,
                     status or 499, elapsed)
