"""Whole-checkpoint conversions behind tools/convert_weight.py and convert_reversed.py:
any checkpoint dsflow reads -> a MindSpore .ckpt with MindFormers names, and a .ckpt
(or any checkpoint) -> a HuggingFace safetensors directory.

Unlike MindFormers' converters (which load the whole model, in fp32 for bf16 weights)
these stream one tensor at a time through the same reader as sharding, so the source
is validated first and never executed, and peak memory is one tensor. The names are a
pure rename (export/checkpoint/mindformers.py), so with the default dtype (the source's own) a
round trip is bit-exact.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from dsflow.common.errors import DsflowError
from dsflow.graphs.tp_plan import weight_specs
from dsflow.export.checkpoint.reader import Checkpoint, side_files_in
from dsflow.common.dtypes import convert
from dsflow.export.checkpoint.hf_writer import DEFAULT_MAX_SHARD_BYTES, write_hf_directory
from dsflow.export.checkpoint.mindformers import hf_to_mindformers
from dsflow.export.checkpoint.mindspore_ckpt import write_mindspore_ckpt
from dsflow.export.weights.split import check_finite

# progress(done, total) after each tensor
Progress = Callable[[int, int], None]


def run_tool(tool: str, action: Callable[[], Path]) -> int:
    """Exit status of a conversion tool: 0 with the seed's closing line, or 1 with
    one line `<tool>: error: ...` naming what is wrong."""
    try:
        out = action()
    except DsflowError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 1
    print(f"Convert finished, the output is saved to {out}.", file=sys.stderr)
    return 0


def _no_progress(done: int, total: int) -> None:
    pass


def full_tensors(ckpt: Checkpoint, dtype: str,
                 progress: Progress = _no_progress) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, whole tensor in `dtype`) in plan order, checked for NaN/Inf; the
    mapped pages of each are dropped once the consumer moves on."""
    specs = weight_specs(ckpt.config)
    for i, spec in enumerate(specs, 1):
        with np.errstate(over="ignore"):  # an overflow is reported below, by name
            arr = convert(ckpt.view(spec.name), ckpt.dtype(spec.name), dtype)
        yield spec.name, check_finite(arr, dtype, spec.name, ckpt.file_of(spec.name))
        ckpt.release(spec.name)
        progress(i, len(specs))


def to_mindspore_ckpt(source: str | Path, ckpt_path: str | Path, dtype: Optional[str] = None,
                      config: str | Path | None = None,
                      progress: Progress = _no_progress) -> Path:
    """Write `ckpt_path` (MindFormers names) from a validated checkpoint."""
    with Checkpoint(source, config) as ckpt:
        ckpt.validate()
        dtype = dtype or ckpt.weights_dtype()
        write_mindspore_ckpt(ckpt_path, ((hf_to_mindformers(n), a, dtype)
                                         for n, a in full_tensors(ckpt, dtype, progress)))
    return Path(ckpt_path).resolve()


def to_hf_directory(source: str | Path, out: str | Path, dtype: Optional[str] = None,
                    config: str | Path | None = None,
                    side_files_from: str | Path | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    progress: Progress = _no_progress) -> Path:
    """Write the HuggingFace directory `out` from a validated checkpoint; tokenizer
    files come from beside the checkpoint, or from `side_files_from`."""
    with Checkpoint(source, config) as ckpt:
        ckpt.validate()
        dtype = dtype or ckpt.weights_dtype()
        layout = [(s.name, s.shape, dtype) for s in weight_specs(ckpt.config)]
        side = side_files_in(Path(side_files_from) if side_files_from else ckpt.directory)
        return write_hf_directory(Path(out), _with_dtype(ckpt.hf_config, dtype), layout,
                                  full_tensors(ckpt, dtype, progress), side,
                                  max_shard_bytes)


def _with_dtype(hf_config: dict, dtype: str) -> dict:
    """config.json as read, with its dtype key (transformers 5 spells it `dtype`)
    saying `dtype`; unchanged when it already does, so round trips are exact."""
    key = "dtype" if "dtype" in hf_config and "torch_dtype" not in hf_config else "torch_dtype"
    if hf_config.get(key) == dtype:
        return hf_config
    return {**hf_config, key: dtype}
