"""`dsexport`: build per-rank MindIR artifacts from a DeepSeek-Coder checkpoint."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import (CONTEXT_SETTINGS, run_command, setup_logging, version_option,
                               written_report)
from dsflow.common.errors import OptionError
from dsflow.graphs.kernels import TARGETS
from dsflow.graphs.onnx_model import ONNX_TARGET, QUANT_MODES

DEFAULT_OUT = "dsflow-artifacts"


class _BuildProgress:
    """One progress bar per rank (weights loaded, then each graph exported)."""

    def __init__(self, tp: int, quiet: bool):
        self.tp, self.quiet = tp, quiet
        self.bar = None

    def __call__(self, event: str, rank: int, kind: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if event == "tensor":
            if done == 1:
                self._close()
                self.bar = click.progressbar(length=total, label=f"rank {rank}/{self.tp}: weights",
                                             file=sys.stderr, show_pos=True)
                self.bar.__enter__()
            self.bar.update(1)
            if done == total:
                self._close()
        else:
            click.echo(f"rank {rank}/{self.tp}: {kind} graph exported ({done}/{total})",
                       err=True)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.group(context_settings=CONTEXT_SETTINGS)
@version_option("dsexport")
def main() -> None:
    """Export DeepSeek-Coder to per-rank MindSpore prefill/decode graphs.

    \b
    Typical use:
      dsexport build --model ./deepseek-coder-6.7b-instruct --tp 4
      dsrun --prompt "def quick_sort(arr):"
    """


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A HuggingFace directory (config.json, *.safetensors or pytorch_model*.bin, "
                   "tokenizer files), a MindFormers .ckpt (file or directory), or a "
                   "`dsexport shard` output. Default: the embedded default model, a small "
                   "DeepSeek-Coder-architecture model trained on Python's standard library "
                   "that ships with dsflow (docs/DEFAULT_MODEL.md).")
@click.option("--tp", type=int, default=1, show_default=True,
              help="Tensor-parallel degree: ranks (worker processes / cards). Must divide "
                   "the attention heads, KV heads and MLP size (33B: 1, 2, 4 or 8).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Artifacts directory to write (replaced atomically when the build succeeds).")
@click.option("--target", type=click.Choice([*TARGETS, ONNX_TARGET]), default="cpu",
              show_default=True,
              help="cpu: portable fp32 graphs run by MindSpore here. ascend: fused Ascend "
                   "operators, bf16 weights, MindSpore Lite configs (and conversion where "
                   "converter_lite is found); runs only on Ascend (docs/ASCEND.md). onnx: "
                   "one ONNX model per rank for ONNX Runtime's CPU provider (tp 1; edge "
                   "and CPU hosts, with --quant for int8/int4 weights).")
@click.option("--quant", type=click.Choice(list(QUANT_MODES)), default=None,
              help="onnx: weight-only quantisation of the linear layers (MatMulNBits); "
                   "the embedding stays fp32. Default: none.")
@click.option("--quant-block-size", type=int, default=None,
              help="onnx with --quant: input features per quantisation scale, a power of "
                   "two >= 16 (default 128; 32 is a little more accurate and slower).")
@click.option("--dtype", default=None,
              help="Weight dtype: float32/fp32, bfloat16/bf16 or float16/fp16. Default: "
                   "float32 for cpu, bfloat16 for ascend.")
@click.option("--buckets", default=None,
              help="Comma-separated prompt/cache length buckets; a prompt is padded to the "
                   "smallest that holds it. Default for ascend: 512,1024,2048,4096,8192,"
                   "16384 (capped by --max-seq-len); none for cpu (any length).")
@click.option("--batch-sizes", default="1", show_default=True,
              help="ascend: comma-separated batch sizes to build gears for.")
@click.option("--cache-mode", type=click.Choice(["window", "resident"]), default=None,
              help="KV cache at the graph boundary. window: the worker keeps the slot "
                   "cache and hands each step a window of it (default for cpu). resident: "
                   "the graphs take and return the whole slot cache, which stays on the "
                   "device (default for ascend: slots = the largest --batch-sizes, "
                   "capacity = the largest bucket, fixed at build). resident on cpu runs "
                   "the same cache plumbing as the Ascend graphs (a check, slower).")
@click.option("--devices", default=None,
              help="ascend: card of each rank for the rank table, e.g. 0,1,2,3 "
                   "(default 0..tp-1).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="config.json or MindFormers predict yaml, when the checkpoint has none.")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest prompt + generation the artifacts accept (KV cache limit). "
                   "Default: the model's max_position_embeddings.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object when done: files written, bytes, sha256, seconds.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show MindSpore's own log lines, and the traceback of a failure.")
@run_command("dsexport")
def build(model_dir: Optional[Path], tp: int, out: Path, target: str, dtype: Optional[str],
          quant: Optional[str], quant_block_size: Optional[int],
          buckets: Optional[str], batch_sizes: str, cache_mode: Optional[str],
          devices: Optional[str],
          config_path: Optional[Path], max_seq_len: Optional[int], quiet: bool,
          as_json: bool, verbose: bool) -> None:
    """Shard a checkpoint by rank and export each rank's prefill and decode graphs.

    Writes OUT/manifest.json (model config, tp plan, graph signatures, KV-cache layout,
    sha256 of every file), OUT/tokenizer/ and OUT/rank<R>/{prefill,decode}.mindir
    (--target onnx: OUT/rank0/model.onnx + model.onnx.data, one graph for both).
    Nothing is left behind on failure.
    """
    from dsflow.common.logs import quiet_mindspore
    from dsflow.common.options import int_list, parse_dtype
    quiet_mindspore(verbose)
    setup_logging(verbose)
    from dsflow.export.pipeline.build import BuildOptions, build as run_build
    started = time.monotonic()
    quiet = quiet or as_json
    if tp < 1:
        raise OptionError(f"--tp {tp}: must be at least 1")
    options = dict(tp=tp, target=target, dtype=parse_dtype(dtype), max_seq_len=max_seq_len,
                   config=config_path, buckets=int_list(buckets, "--buckets"),
                   batch_sizes=tuple(int_list(batch_sizes, "--batch-sizes") or (1,)),
                   device_ids=int_list(devices, "--devices"), cache_mode=cache_mode,
                   quant=quant, quant_block_size=quant_block_size)
    if model_dir is None:
        from dsflow.export.pipeline.default_model import default_model_dir
        model_dir = default_model_dir()
    result = run_build(BuildOptions(model_dir=model_dir, out=out, **options),
                       progress=_BuildProgress(tp, quiet),
                       notice=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(written_report("build", result, started, tp=tp, target=target))
    elif not quiet:
        click.echo(f"artifacts written to {result}", err=True)


def _register() -> None:
    """Subcommands that live in their own modules."""
    from dsflow.export.cli.inspect import inspect
    from dsflow.export.cli.weights import merge, plan, shard
    for command in (shard, merge, plan, inspect):
        main.add_command(command)


_register()
