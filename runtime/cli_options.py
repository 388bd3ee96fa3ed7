"""The options dsrun and dsserve share: which artifacts, where their ranks run, whether
the files are checked first, and how the engine sizes its KV cache. Declared once so
both commands say the same; each is a field of runtime/engine.py EngineOptions."""
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
                 help="Tokens per step while sequences decode (default 64; 128 for ONNX "
                      "artifacts, whose steps cost their graph calls more than their "
                      "tokens): each decoding "
                      "sequence counts 1 and prompts are prefilled in what is left (at least "
                      "16), so a new request never stalls the running streams for a whole "
                      "chunk. Larger: prompts are prefilled in fewer steps, but each such "
                      "step delays the running streams more; smaller: steadier streaming "
                      "(docs/BENCHMARKS.md)."),
    click.option("--prefix-reuse/--no-prefix-reuse", default=True, show_default=True,
                 help="A new request takes the free slot whose cached tokens share the "
                      "longest prefix with its prompt, and prefills only the rest (an "
                      "editor resending a file, a chat's next turn)."),
    click.option("--step-timeout", type=float, default=None,
                 help="Seconds a step may wait for every rank (default 60); a rank that "
                      "stays silent longer (a hung collective, a stopped process) fails "
                      "the worker cluster, which dsserve then restarts."),
)


def engine_options(command: Callable) -> Callable:
    for option in reversed(ENGINE_OPTIONS):
        command = option(command)
    return command


def options_from(*, verify: bool, device, devices, allow_version_mismatch: bool,
                 max_batch, max_seq_len, cache_mb, prefill_chunk, max_step_tokens,
                 prefix_reuse: bool = True, step_timeout=None, verbose: bool = False,
                 **extra):
    """The EngineOptions the shared options describe (`extra`: further EngineOptions
    fields), checked: an option mistake is a usage error (exit 2), before any artifact
    is read."""
    from dsflow.common.errors import DsflowError, OptionError
    from dsflow.common.options import int_list
    from dsflow.runtime.engine import DEFAULT_STEP_TIMEOUT_S, EngineOptions
    ids = int_list(devices, "--devices")
    options = EngineOptions(
        verbose=verbose, verify=verify, device=device,
        device_ids=tuple(ids) if ids is not None else None, max_batch=max_batch,
        max_seq_len=max_seq_len, cache_mb=cache_mb, prefill_chunk=prefill_chunk,
        max_step_tokens=max_step_tokens, prefix_reuse=prefix_reuse,
        step_timeout_s=DEFAULT_STEP_TIMEOUT_S if step_timeout is None else step_timeout,
        allow_version_mismatch=allow_version_mismatch, **extra)
    try:
        options.check()
    except DsflowError as e:
        raise OptionError(str(e)) from None
    return options


def open_engine(*, artifacts: Path, **options):
    """The Engine the shared options describe, so that every mode of a command honours
    all of them."""
    from dsflow.runtime.engine import Engine
    return Engine(artifacts, options_from(**options))
