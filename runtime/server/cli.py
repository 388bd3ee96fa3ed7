"""`dsserve`: the OpenAI-compatible server on one Engine, run by uvicorn.

Exit codes, for a supervisor (common/cli.py's, plus 3): 0 after SIGTERM/SIGINT
(in-flight requests drained), 1 when it cannot start (artifacts, port, workers), 2 for a
bad option value, 3 when the worker cluster failed and could not be restarted within
--max-restarts.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import CONTEXT_SETTINGS, run_command, version_option
from dsflow.common.errors import DsflowError, OptionError
from dsflow.runtime.cli_options import engine_options, options_from
from dsflow.runtime.engine import Engine
from dsflow.runtime.server.lifecycle import run
from dsflow.runtime.server.openai_api import ServerOptions
from dsflow.runtime.server.supervisor import RestartPolicy


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the (slow) engine start so that a taken port
    fails at once; the rank workers do not inherit it (close_fds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DsflowError(f"--host {host} --port {port}: cannot listen ({e.strerror})") from None
    return sock


def _stop_startup(signum, frame) -> None:
    # SIGTERM while the workers start: unwind through Engine's cleanup and exit 0.
    # SystemExit, a BaseException, passes the `except Exception` of loading code.
    raise SystemExit(0)


def check_options(host: str, api_key: Optional[str], minimums: dict[str, tuple[int, int]]
                  ) -> None:
    for name, (value, least) in minimums.items():
        if value < least:
            raise OptionError(f"{name} {value}: must be at least {least}")
    if api_key == "":
        raise OptionError("--api-key: empty key")
    if not is_loopback(host) and api_key is None:
        click.echo(f"dsserve: warning: listening on {host} without --api-key: anyone who can "
                   "reach this address can use the model", err=True)


@click.command(context_settings={**CONTEXT_SETTINGS, "max_content_width": 100})
@version_option("dsserve")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback should have --api-key.")
@click.option("--port", type=int, default=8000, show_default=True, help="0 picks a free port.")
@click.option("--api-key", envvar="DSSERVE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/*. Also read from "
                   "$DSSERVE_API_KEY (keeps it out of `ps`). Default: no authentication.")
@click.option("--served-model-name", default=None,
              help="The model name clients send and /v1/models lists. Default: from the "
                   "artifacts.")
@click.option("--max-queue", type=int, default=256, show_default=True,
              help="Requests waiting for a slot; beyond it requests get 429 + Retry-After.")
@click.option("--max-prompts", type=int, default=16, show_default=True,
              help="Sequences (prompts x n) one request may start.")
@click.option("--max-body-kb", type=int, default=4096, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--request-timeout", type=float, default=600.0, show_default=True,
              help="Seconds a request may take (queue + generation); then it is cancelled "
                   "(504, or an error event in a stream). 0 = no limit.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM: seconds in-flight requests get to finish before they are "
                   "cancelled.")
@click.option("--max-restarts", type=int, default=3, show_default=True,
              help="Restart attempts after the worker cluster fails, before exiting with "
                   "code 3.")
@click.option("--restart-backoff", type=float, default=1.0, show_default=True,
              help="Seconds before the second restart attempt; doubles each attempt.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per request on standard error (logger dsflow.server.access).")
@click.option("-v", "--verbose", is_flag=True,
              help="Engine lines at INFO, MindSpore's own output, and the traceback of a "
                   "failure.")
@run_command("dsserve")
def main(artifacts: Path, host: str, port: int, api_key: Optional[str],
         served_model_name: Optional[str], device: Optional[str], devices: Optional[str],
         allow_version_mismatch: bool, verify: bool, max_batch: Optional[int], max_seq_len: Optional[int],
         cache_mb: Optional[float], prefill_chunk: Optional[int],
         max_step_tokens: Optional[int], prefix_reuse: bool, step_timeout: Optional[float],
         max_queue: int,
         max_prompts: int, max_body_kb: int, request_timeout: float, shutdown_timeout: float,
         max_restarts: int, restart_backoff: float, access_log: bool, verbose: bool) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions,
    /health, /metrics) from dsflow artifacts.

    \b
    Examples:
      dsserve --artifacts ./ds67-tp4
      DSSERVE_API_KEY=secret dsserve --artifacts ./ds67-tp4 --host 0.0.0.0 --port 8000
    """
    # a server's log lines need their time, unlike dsrun's (common.cli.setup_logging)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dsflow.server.access").setLevel(
        logging.INFO if access_log else logging.WARNING)
    check_options(host, api_key, {"--max-queue": (max_queue, 1),
                                  "--max-prompts": (max_prompts, 1),
                                  "--max-body-kb": (max_body_kb, 1),
                                  "--max-restarts": (max_restarts, 0)})
    # option mistakes exit 2 before the port is taken or the artifacts are read
    engine_options = options_from(verify=verify, device=device, devices=devices,
                                  allow_version_mismatch=allow_version_mismatch,
                                  max_batch=max_batch, max_seq_len=max_seq_len,
                                  cache_mb=cache_mb, prefill_chunk=prefill_chunk,
                                  max_step_tokens=max_step_tokens, prefix_reuse=prefix_reuse,
                                  step_timeout=step_timeout, verbose=verbose,
                                  max_queue=max_queue)
    sock = bind(host, port)
    signal.signal(signal.SIGTERM, _stop_startup)
    try:
        engine = Engine(artifacts, engine_options)
    except BaseException:
        sock.close()
        raise
    try:  # from here on, any way out stops the workers
        options = ServerOptions(model_name=served_model_name or engine.model_name,
                                api_key=api_key, max_prompts=max_prompts,
                                max_body_bytes=max_body_kb * 1024,
                                request_timeout_s=request_timeout or None)
        policy = RestartPolicy(max_restarts=max_restarts, backoff_s=restart_backoff)

        def announce() -> None:  # once listening: clients (and tests) act on this line
            click.echo(f"dsserve: serving {options.model_name} on http://{host}:"
                       f"{sock.getsockname()[1]} (tp={engine.manifest.tp}; "
                       f"{engine.plan.describe()})", err=True)
        code = run(engine, sock, options, policy, shutdown_timeout, on_listening=announce)
    finally:
        engine.close()
    if code:
        raise click.exceptions.Exit(code)


if __name__ == "__main__":
    main()
