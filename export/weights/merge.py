"""`dsexport merge`: per-rank shards back to a HuggingFace directory, bit-exact.

Each full tensor is rebuilt from the ranks' parts the way the plan split it
(graphs/tp_plan.py): column and vocabulary splits are concatenated along axis 0, row
splits along axis 1, and the zero rows that padded a vocabulary tp does not divide are
cut off; replicated tensors come from rank 0. One full tensor is in memory at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from dsflow.graphs.tp_plan import weight_specs
from dsflow.export.checkpoint.hf_writer import DEFAULT_MAX_SHARD_BYTES, TensorProgress, write_hf_directory
from dsflow.export.weights.rank_files import ShardsIndex, open_rank, verify


def full_tensors(index: ShardsIndex) -> Iterator[tuple[str, np.ndarray]]:
    """(name, full tensor) for every weight of the plan, from the rank files."""
    files = [open_rank(index, r) for r in range(index.tp)]
    try:
        for spec in weight_specs(index.config):
            if spec.axis is None:
                yield spec.name, files[0].array(spec.name)
            else:
                full = np.concatenate([f.array(spec.name) for f in files], axis=spec.axis)
                for f in files:
                    f.release()  # the parts' pages; `full` is a copy
                keep = [slice(None)] * full.ndim
                keep[spec.axis] = slice(0, spec.shape[spec.axis])  # undo vocab padding
                yield spec.name, full[tuple(keep)]
            files[0].release()
    finally:
        for f in files:
            f.close()


def merge_shards(shards_dir: str | Path, out: str | Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress: TensorProgress = lambda done, total: None) -> Path:
    """Write the HuggingFace directory `out` (config.json, model*.safetensors, tokenizer
    files) from a verified shards directory; returns `out`."""
    index = verify(shards_dir)
    layout = [(s.name, s.shape, index.dtype) for s in weight_specs(index.config)]
    return write_hf_directory(Path(out), index.hf_config, layout, full_tensors(index),
                              index.side_files(), max_shard_bytes, progress)
