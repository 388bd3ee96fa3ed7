"""The server's life: uvicorn serving the app until SIGTERM/SIGINT (drain, exit 0) or
until the supervisor gives the engine up (exit 3)."""
from __future__ import annotations

import signal
import socket
import threading
from typing import Callable

import uvicorn

from dsflow.runtime.server.app import create_app
from dsflow.runtime.server.metrics import Metrics
from dsflow.runtime.server.openai_api import ServerOptions
from dsflow.runtime.server.malformed_http import OpenAIErrorH11Protocol
from dsflow.runtime.server.supervisor import RestartPolicy, Supervisor


class DsserveServer(uvicorn.Server):
    """uvicorn's server; a signal first turns /health and admission to 'draining'."""

    def __init__(self, config: uvicorn.Config, supervisor: Supervisor,
                 on_listening: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.supervisor = supervisor
        self.exit_code = 0
        self.on_listening = on_listening
        self.listening = threading.Event()  # for whoever runs it on a thread (tests)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        # only now does the socket accept: announcing earlier lets a client that acts
        # on the announcement be refused
        self.on_listening()
        self.listening.set()

    def handle_exit(self, sig, frame) -> None:
        self.supervisor.drain()
        super().handle_exit(sig, frame)

    def fatal(self, code: int) -> None:
        self.exit_code = code
        self.should_exit = True


def build_server(engine, options: ServerOptions, policy: RestartPolicy,
                 shutdown_timeout: float,
                 on_listening: Callable[[], None] = lambda: None) -> DsserveServer:
    metrics = Metrics(engine.health)
    supervisor = Supervisor(engine, metrics, policy)
    app = create_app(engine, options, supervisor, metrics)
    config = uvicorn.Config(app, http=OpenAIErrorH11Protocol, lifespan="on", log_config=None,
                            access_log=False, timeout_graceful_shutdown=shutdown_timeout)
    server = DsserveServer(config, supervisor, on_listening)
    supervisor.on_fatal = server.fatal
    return server


def run(engine, sock: socket.socket, options: ServerOptions, policy: RestartPolicy,
        shutdown_timeout: float, on_listening: Callable[[], None] = lambda: None) -> int:
    """Serve on `sock` until stopped; returns the process exit code."""
    server = build_server(engine, options, policy, shutdown_timeout, on_listening)
    # after a graceful stop uvicorn re-raises the signal it caught, to the handler it
    # found installed: make that one a no-op so that a drained server exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return server.exit_code
