"""The options dsrun and dsserve share: which artifacts, where their ranks run, and
whether the files are checked first. Declared once so both commands say the same."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

ENGINE_OPTIONS = (
    click.option("--artifacts", type=click.Path(path_type=Path), default="dsflow-artifacts",
                 show_default=True, help="Directory written by `dsexport build`."),
    click.option("--verify", is_flag=True,
                 help="Check the sha256 of every artifact against the manifest before "
                      "loading."),
    click.option("--device", type=click.Choice(["cpu", "ascend"]), default=None,
                 help="Where the ranks run. Default: the target the artifacts were built "
                      "for."),
    click.option("--devices", default=None,
                 help="Ascend card of each rank, comma-separated (e.g. 0,1,2,3). Default "
                      "0..tp-1."),
)


def engine_options(command: Callable) -> Callable:
    for option in reversed(ENGINE_OPTIONS):
        command = option(command)
    return command
