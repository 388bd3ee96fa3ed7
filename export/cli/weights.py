"""`dsexport shard`, `dsexport merge`, `dsexport plan`: the weights commands.

Standalone click commands, registered on the `dsexport` group by export/cli/main.py
(`main.add_command(shard)` ...) and testable on their own with click's CliRunner.
Like every dsexport command, a user error is one line `dsexport: error: ...` on
stderr and exit code 2; progress goes to stderr.
"""
from __future__ import annotations

import json
import re
import time
import sys
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import CONTEXT_SETTINGS as CONTEXT, run_command, written_report
from dsflow.common.errors import OptionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.I)


def parse_size(text: str, option: str) -> int:
    """'5GB' (10^9), '2GiB' (2^30), '500MB', or plain bytes."""
    m = _SIZE.match(text)
    if not m:
        raise OptionError(f"{option} {text}: expected a size like 5GB, 500MB or 2GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    base = 1024 if m.group(3).upper().startswith("I") else 1000
    return int(float(m.group(1)) * base ** power)


class _Bars:
    """Stderr progress bars, one per unit of work (a rank, a merge)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def step(self, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None or done == 1:
            self.close()
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                         show_pos=True)
            self.bar.__enter__()
        self.bar.update(1)
        if done == total:
            self.close()

    def note(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command(context_settings=CONTEXT)
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="Checkpoint: a HuggingFace directory (safetensors or pytorch_model*.bin, "
                   "single or index-sharded), or a MindSpore .ckpt with MindFormers names "
                   "(the file, or a directory holding it).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Shards directory to write (rank<R>.safetensors + shards.json). A re-run "
                   "keeps ranks that are already complete.")
@click.option("--tp", type=int, default=1, show_default=True,
              help="Tensor-parallel degree (33B: 1, 2, 4 or 8).")
@click.option("--dtype", default=None,
              help="bf16, fp16 or fp32. Default: the checkpoint's own (bf16 stays bf16).")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="config.json or MindFormers predict yaml, if not beside the weights.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: files written, bytes, sha256, seconds.")
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of a failure.")
@run_command("dsexport")
def shard(model_path: Path, out: Path, tp: int, dtype: Optional[str],
          config: Optional[Path], quiet: bool, as_json: bool, verbose: bool) -> None:
    """Split a checkpoint into per-rank weight files, one tensor in memory at a time.

    Validates the whole checkpoint first (every tensor present, shapes and dtypes as
    the config implies, files intact), then writes OUT/rank<R>.safetensors in the
    tensor-parallel plan's per-rank shapes and OUT/shards.json last. Used by
    `dsexport build --model OUT` and `dsexport merge OUT`.
    """
    from dsflow.common.options import parse_dtype
    from dsflow.export.weights.rank_files import write_shards
    started = time.monotonic()
    bars = _Bars(quiet or as_json)

    def progress(event: str, rank: int, done: int, total: int) -> None:
        if event == "skip":
            bars.note(f"rank {rank}/{tp}: complete from an earlier run, kept")
        else:
            bars.step(f"rank {rank}/{tp}", done, total)

    if tp < 1:
        raise OptionError(f"--tp {tp}: must be at least 1")
    try:
        index = write_shards(model_path, out, tp, parse_dtype(dtype), progress, config)
    finally:
        bars.close()
    size = sum(r["bytes"] for r in index.data["ranks"])
    bars.note(f"{tp} rank file(s), {size / 1e9:.2f} GB of {index.dtype}, written to "
              f"{index.root}")
    if as_json:
        click.echo(written_report("shard", index.root, started, tp=tp, dtype=index.dtype))


@click.command(context_settings=CONTEXT)
@click.argument("shards_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="HuggingFace directory to create (must not exist, or be empty).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest model*.safetensors file; above it the weights are split and "
                   "model.safetensors.index.json is written.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: files written, bytes, sha256, seconds.")
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of a failure.")
@run_command("dsexport")
def merge(shards_dir: Path, out: Path, max_shard_size: str, quiet: bool, as_json: bool,
          verbose: bool) -> None:
    """Rebuild a HuggingFace directory from a shards directory, bit-exact.

    Checks every rank file's sha256 against shards.json, joins each tensor's parts
    (dropping vocabulary padding) and writes config.json, model*.safetensors and the
    tokenizer files the checkpoint had.
    """
    from dsflow.export.weights.merge import merge_shards
    started = time.monotonic()
    bars = _Bars(quiet or as_json)
    limit = parse_size(max_shard_size, "--max-shard-size")
    try:
        result = merge_shards(shards_dir, out, limit,
                              lambda done, total: bars.step("merging", done, total))
    finally:
        bars.close()
    bars.note(f"HuggingFace directory written to {result}")
    if as_json:
        click.echo(written_report("merge", result, started))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _print_plan(report: dict) -> None:
    click.echo(f"{report['config']}: tp={report['tp']} batch={report['batch']} "
               f"max_seq={report['max_seq']} dtype={report['dtype']} "
               f"flash_attention={'yes' if report['flash_attention'] else 'no'}")
    click.echo("rank | weights GiB | KV cache GiB | activations GiB | total GiB")
    for r in report["ranks"]:
        click.echo(f"{r['rank']:>4} | {_gib(r['weights_bytes']):>11} | "
                   f"{_gib(r['kv_cache_bytes']):>12} | {_gib(r['activation_bytes']):>15} | "
                   f"{_gib(r['total_bytes']):>9}")
    limits, fits = report["limits"], report["fits"]
    click.echo(f"fits an Ascend 910B per rank ({_gib(limits['ascend_910b_hbm_bytes'])} GiB "
               f"HBM): {'yes' if fits['ascend_910b'] else 'no'}")
    click.echo(f"fits this machine's RAM with all {report['tp']} rank(s) "
               f"({_gib(report['total_bytes'])} of {_gib(limits['host_ram_bytes'])} GiB): "
               f"{'yes' if fits['host_ram'] else 'no'}")


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="config.json, a MindFormers yaml, or a model directory holding one.")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel degree.")
@click.option("--max-seq", type=int, default=None,
              help="Prompt + generation length the KV cache holds (default: the model's).")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences per batch.")
@click.option("--dtype", default="bf16", show_default=True, help="bf16, fp16 or fp32.")
@click.option("--flash-attention", is_flag=True,
              help="Assume a flash-attention kernel (Ascend): no seq x seq score matrix.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of a failure.")
@run_command("dsexport")
def plan(config_path: Path, tp: int, max_seq: Optional[int], batch: int, dtype: str,
         flash_attention: bool, as_json: bool, verbose: bool) -> None:
    """Per-rank memory: weights, KV cache, activations; fits an Ascend 910B? this host?

    Weights follow the tensor-parallel plan (replicated embedding, vocabulary padding
    included: the bytes `dsexport shard` writes); the KV cache is
    2 * layers * batch * kv_heads/tp * max_seq * head_dim * itemsize; activations are
    the prefill peak estimated in docs/WEIGHTS.md.
    """
    from dsflow.export.checkpoint.reader import read_config
    from dsflow.common.options import parse_dtype
    from dsflow.export.weights.memory_plan import plan_report
    source = read_config(config_path)
    seq = max_seq or source.config.max_position_embeddings
    for option, value in (("--tp", tp), ("--max-seq", seq), ("--batch", batch)):
        if value < 1:
            raise OptionError(f"{option} {value}: must be at least 1")
    report = plan_report(source.config, source.path, tp, seq, batch,
                         parse_dtype(dtype), flash_attention)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_plan(report)

