"""`dsserve`: the HTTP server (runtime/server.py) on top of one Engine."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from dsflow.common.cli import CONTEXT_SETTINGS, run_command, version_option
from dsflow.common.errors import DsflowError


@click.command(context_settings=CONTEXT_SETTINGS)
@version_option("dsserve")
@click.option("--artifacts", type=click.Path(path_type=Path), default="dsflow-artifacts",
              show_default=True, help="Directory written by `dsexport build`.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. There is no authentication: keep it on loopback "
                   "unless a proxy in front of it authenticates.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Log requests and MindSpore's own lines.")
@run_command("dsserve")
def main(artifacts: Path, host: str, port: int, verbose: bool) -> None:
    """Serve OpenAI-style /v1/completions and /v1/chat/completions from dsflow artifacts."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.server import make_server
    engine = Engine(artifacts, verbose=verbose)
    try:
        server = make_server(engine, host, port)
    except OSError as e:
        engine.close()
        raise DsflowError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    # shutdown() blocks until serve_forever returns, so it must run on another thread
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    click.echo(f"dsserve: listening on http://{host}:{server.server_address[1]} "
               f"(tp={engine.manifest.tp})", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()
