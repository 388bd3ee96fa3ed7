"""`dsserve`: the HTTP server (runtime/server.py) on top of one Engine."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from ..graphs.errors import DsflowError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", type=click.Path(path_type=Path), default="dsflow-artifacts",
              show_default=True, help="Directory written by `dsexport build`.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. There is no authentication: keep it on loopback "
                   "unless a proxy in front of it authenticates.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Log requests and MindSpore's own lines.")
def main(artifacts: Path, host: str, port: int, verbose: bool) -> None:
    """Serve OpenAI-style /v1/completions and /v1/chat/completions from dsflow artifacts."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from .engine import Engine
    from .server import make_server
    try:
        engine = Engine(artifacts, verbose=verbose)
    except DsflowError as e:
        click.echo(f"dsserve: error: {e}", err=True)
        sys.exit(2)
    try:
        server = make_server(engine, host, port)
    except OSError as e:
        engine.close()
        click.echo(f"dsserve: error: cannot listen on {host}:{port} ({e.strerror})", err=True)
        sys.exit(2)
    # shutdown() blocks until serve_forever returns, so it must run on another thread
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    click.echo(f"dsserve: listening on http://{host}:{server.server_address[1]} "
               f"(tp={engine.manifest.tp})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
