"""The options dsrun and dsserve share: which artifacts, where their ranks run, whether
the files are checked first, and how the engine sizes its KV cache. Declared once so
both commands say the same; each is an Engine argument of the same name."""
from __future__ import annotations

import os
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
    click.option("--allow-version-mismatch", is_flag=True,
                 help="ascend: run although the installed mindspore_lite's release differs "
                      "from the MindSpore that exported the graphs (refused by default: GE's "
                      "operator adapters change between releases)."),
    click.option("--max-batch", type=int, default=None,
                 help="Sequences the KV cache holds at once (default 8, or what --cache-mb "
                      "holds)."),
    click.option("--max-seq-len", type=int, default=None,
                 help="Tokens (prompt + new) per sequence; default: the artifacts' maximum."),
    click.option("--cache-mb", type=float, default=None,
                 help="KV cache budget per rank in MiB; sets how many sequences fit."),
    click.option("--prefill-chunk", type=int, default=None,
                 help="Prompt tokens prefilled per step when nothing decodes (default "
                      "256); long prompts take several steps."),
    click.option("--max-step-tokens", type=int, default=None,
                 help="Tokens per step while sequences decode (default 64): each decoding "
                      "sequence counts 1 and prompts are prefilled in what is left (at least "
                      "16), so a new request never stalls the running streams for a whole "
                      "chunk. Larger: prompts are prefilled in fewer steps, but each such "
                      "step delays the running streams more; smaller: steadier streaming "
                      "(docs/BENCHMARKS.md)."),
)


def engine_options(command: Callable) -> Callable:
    for option in reversed(ENGINE_OPTIONS):
        command = option(command)
    return command


def apply_version_override(allow_version_mismatch: bool) -> None:
    """--allow-version-mismatch reaches each rank's Lite backend through the environment
    the workers inherit (runtime/backends/lite.py reads it)."""
    if allow_version_mismatch:
        from dsflow.runtime.backends.lite import VERSION_OVERRIDE_ENV
        os.environ[VERSION_OVERRIDE_ENV] = "1"


def open_engine(*, artifacts: Path, verify: bool, device, devices, allow_version_mismatch: bool,
                max_batch, max_seq_len, cache_mb, prefill_chunk, max_step_tokens,
                verbose: bool, **extra):
    """The Engine the shared options describe (`extra`: further Engine arguments), so
    that every mode of a command honours all of them."""
    from dsflow.common.options import int_list
    from dsflow.runtime.engine import Engine
    apply_version_override(allow_version_mismatch)
    return Engine(artifacts, verbose=verbose, verify=verify, device=device,
                  device_ids=int_list(devices, "--devices"), max_batch=max_batch,
                  max_seq_len=max_seq_len, cache_mb=cache_mb, prefill_chunk=prefill_chunk,
                  max_step_tokens=max_step_tokens, **extra)
