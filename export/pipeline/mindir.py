"""Exporting one rank's prefill and decode graphs to MindIR.

Placeholders come from `graphs.signatures`: dynamic axes (batch, seq, kv_len) become
None, so one file serves every batch size, prompt length and cache length (the first
call at a new shape compiles, ~0.5 s on CPU). Graphs are exported in this one process
without a communication init: their AllReduce ops name `hccl_world_group`, which is
native on Ascend and which the CPU workers create after init().
"""
from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
from mindspore import Tensor

from dsflow.graphs.model import DTYPES, GRAPH_CLASSES, RankModel
from dsflow.graphs.signatures import GraphSignature

MS_DTYPES = {"int32": ms.int32, **DTYPES}


def placeholders(sig: GraphSignature) -> list[Tensor]:
    return [Tensor(shape=t.placeholder_shape(), dtype=MS_DTYPES[t.dtype]) for t in sig.inputs]


def export_graph(net: RankModel, sig: GraphSignature, path_stem: Path) -> Path:
    """Export `sig.kind` of `net` to `<path_stem>.mindir`; returns the file to load.

    Over 1 GB of parameters MindSpore writes `<stem>_graph.mindir` plus a
    `<stem>_variables/` directory instead; the returned path is the one to load.
    """
    graph = GRAPH_CLASSES[sig.kind, sig.cache_mode](net)
    ms.export(graph, *placeholders(sig), file_name=str(path_stem), file_format="MINDIR")
    single = path_stem.with_name(path_stem.name + ".mindir")
    split = path_stem.with_name(path_stem.name + "_graph.mindir")
    out = single if single.exists() else split
    if not out.exists():
        raise RuntimeError(f"MindSpore export wrote neither {single} nor {split}")
    for p in [out, *(path_stem.parent / (path_stem.name + "_variables")).glob("*")]:
        os.chmod(p, 0o444)  # MindSpore writes 0400; others on the host may run it
    return out
