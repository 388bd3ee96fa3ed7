"""One error path for dsexport, dsrun and dsserve.

Every command body runs under `run_command`, which turns whatever ends it into one
line on stderr and one exit code, the same in all three commands:

    0    success
    1    failure: a user mistake (DsflowError: the message names the file, tensor or
         option at fault) or the environment (disk full, permission denied, bad bytes
         on stdin); an unexpected exception is one line too, its traceback shown with -v
    2    usage error: click's own (unknown option, bad option type) and OptionError
         (an option value invalid in itself, e.g. --top-p 1.5)
    130  interrupted (Ctrl-C)

The failure is rendered through click (`CommandFailed`, a `click.ClickException`), so
click's standalone mode prints it and exits; nothing else in dsflow calls sys.exit.
"""
from __future__ import annotations

import functools
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import click

from dsflow.common.checksums import files_with_checksums
from dsflow.common.errors import DsflowError, OptionError

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

F = TypeVar("F", bound=Callable[..., Any])


class CommandFailed(click.ClickException):
    """The one exception type a dsflow command ends with; click renders it."""

    exit_code = EXIT_FAILURE

    def __init__(self, prog: str, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.prog = prog
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.prog}: error: {self.message}", err=True)


def describe(exc: BaseException) -> str:
    """One line for an exception, naming the file for OS errors (disk full, permission)."""
    if isinstance(exc, DsflowError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename or ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not valid UTF-8 (byte {exc.start}: {exc.reason})"
    return f"{type(exc).__name__}: {exc}"


def run_command(prog: str, verbose_param: str = "verbose") -> Callable[[F], F]:
    """Decorator for a click command body: the exit-code contract of this module."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            verbose = bool(kwargs.get(verbose_param))
            try:
                return fn(*args, **kwargs)
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except KeyboardInterrupt:
                click.echo(f"\n{prog}: interrupted", err=True)
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
            except DsflowError as e:
                if verbose:
                    traceback.print_exc()
                code = EXIT_USAGE if isinstance(e, OptionError) else EXIT_FAILURE
                raise CommandFailed(prog, describe(e), code) from None
            except Exception as e:  # environmental or unexpected: still one line
                if verbose:
                    traceback.print_exc()
                hint = "" if verbose or isinstance(e, (OSError, UnicodeError)) else \
                    " (run with -v for the traceback)"
                raise CommandFailed(prog, describe(e) + hint) from None
        return inner  # type: ignore[return-value]
    return wrap


def version_option(prog: str) -> Callable[[F], F]:
    return click.version_option(package_name="dsflow", prog_name=prog,
                                message="%(prog)s (dsflow) %(version)s")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")


def written_report(command: str, root: Path, started: float, **extra: Any) -> str:
    """The `--json` report of a command that wrote a directory: every file with its
    bytes and sha256, the total, and the seconds it took."""
    root = Path(root)
    files = files_with_checksums(root)
    return json.dumps({"command": command, "out": str(root.resolve()),
                       "files": files, "bytes": sum(f["bytes"] for f in files.values()),
                       "seconds": round(time.monotonic() - started, 3), **extra},
                      ensure_ascii=False)


def read_stdin_text(stream: Optional[Any] = None) -> str:
    """Standard input as text; invalid UTF-8 becomes one clear error, not a traceback."""
    import sys
    data = (stream or sys.stdin.buffer).read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DsflowError(f"standard input is not valid UTF-8 (byte {e.start}: "
                          f"{e.reason})") from None

