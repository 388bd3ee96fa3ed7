"""Writing a HuggingFace model directory from a stream of full tensors.

Used by `dsexport merge` (rank shards -> HF) and tools/convert_reversed.py (MindSpore
.ckpt -> HF). The file split is decided from the layout (names, shapes, dtypes) before
any data arrives, so tensors stream straight into their file: config.json,
model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json
as transformers writes them when the weights exceed `max_shard_bytes`. The directory
is staged and renamed into place only when complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from dsflow.common.atomic import staged_directory
from dsflow.common.errors import ExportError
from dsflow.export.checkpoint.mapped_file import nbytes
from dsflow.export.checkpoint.safetensors import Layout, SafetensorsWriter

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers 4.x's default max_shard_size="5GB"
HF_METADATA = {"format": "pt"}  # transformers refuses safetensors without it

# progress(done, total) after each tensor written
TensorProgress = Callable[[int, int], None]


def split_layout(layout: Layout, max_shard_bytes: int) -> list[list]:
    """Consecutive groups of tensors of at most `max_shard_bytes` each (a larger
    tensor gets a file of its own), in layout order."""
    groups: list[list] = [[]]
    size = 0
    for entry in layout:
        n = nbytes(entry[1], entry[2])
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def _file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_index(root: Path, groups: list[list], names: list[str]) -> None:
    weight_map = {entry[0]: fname for group, fname in zip(groups, names) for entry in group}
    total = sum(nbytes(e[1], e[2]) for g in groups for e in g)
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_hf_directory(out: Path, hf_config: dict, layout: Layout,
                       tensors: Iterable[tuple[str, np.ndarray]],
                       side_files: Iterable[Path] = (),
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       progress: TensorProgress = lambda done, total: None) -> Path:
    """Write config.json, the weights (streamed from `tensors`, in `layout` order) and
    copies of `side_files` (tokenizer) into a new directory `out`."""
    groups = split_layout(layout, max_shard_bytes)
    names = _file_names(len(groups))
    stream: Iterator = iter(tensors)
    done = 0
    with staged_directory(Path(out)) as root:
        (root / "config.json").write_text(json.dumps(hf_config, indent=2,
                                                     ensure_ascii=False) + "\n")
        for group, fname in zip(groups, names):
            with SafetensorsWriter(root / fname, group, HF_METADATA) as w:
                for entry in group:
                    name, arr = next(stream, (None, None))
                    if name is None:
                        raise ExportError(f"{out}: no data for tensor {entry[0]!r}")
                    w.write(name, arr)
                    done += 1
                    progress(done, len(layout))
        if len(groups) > 1:
            _write_index(root, groups, names)
        for src in side_files:
            shutil.copyfile(src, root / src.name)
    return Path(out).resolve()
