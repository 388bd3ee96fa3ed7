"""Applying the tensor-parallel plan to a checkpoint: one rank's tensors, one at a time."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..graphs.tp_plan import WeightSpec, weight_specs
from .checkpoint import Checkpoint
from .dtypes import convert
from .errors import CheckpointError


def rank_slice(view: np.ndarray, spec: WeightSpec, tp: int, rank: int) -> np.ndarray:
    """Copy out `rank`'s part of a (mapped) tensor; zero rows pad a split vocabulary."""
    if spec.axis is None:
        return np.array(view)
    start, stop, pad = spec.rank_range(tp, rank)
    index = [slice(None)] * view.ndim
    index[spec.axis] = slice(start, stop)
    part = np.array(view[tuple(index)])
    if pad:
        widths = [(0, 0)] * view.ndim
        widths[spec.axis] = (0, pad)
        part = np.pad(part, widths)
    return part


def rank_tensors(ckpt: Checkpoint, tp: int, rank: int,
                 dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, this rank's tensor in `dtype`) for every weight of the plan."""
    for spec in weight_specs(ckpt.config):
        part = convert(rank_slice(ckpt.view(spec.name), spec, tp, rank),
                       ckpt.dtype(spec.name), dtype)
        if dtype == "float32" and not np.isfinite(part).all():
            raise CheckpointError(f"{ckpt.file_of(spec.name)}: tensor {spec.name!r} "
                                  "contains NaN or Inf values")
        yield spec.name, part
