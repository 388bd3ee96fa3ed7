"""dsserve: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one Engine.

    app.py          the FastAPI app: routes, auth, error handlers, /health, /metrics
    openai_api.py   completions and chat: request -> engine submissions -> body or stream
    http_io.py      bounded body reading; disconnect and timeout watching; SSE response
    schemas.py      request validation (pydantic), unknown fields refused
    errors.py       every failure as OpenAI's error shape, mapped in one place
    responses.py    OpenAI's response and chunk shapes
    generation.py   one request's prompts x n on the engine: one submission, one buffer
    supervisor.py   worker-cluster failure -> restart with backoff, or exit 3
    lifecycle.py    uvicorn, SIGTERM drain, exit codes
    metrics.py      /metrics (Prometheus)
    access.py       access log and request counters
    malformed_http.py  malformed-HTTP 400s in OpenAI's shape (uvicorn's h11 protocol)
    cli.py          the `dsserve` command
"""
from dsflow.runtime.server.app import create_app
from dsflow.runtime.server.openai_api import ServerOptions

__all__ = ["ServerOptions", "create_app"]
