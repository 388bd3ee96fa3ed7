"""Worker backend on MindSpore itself: runs the exported MindIR through `nn.GraphCell`.

The slot cache is numpy in this process (runtime/slot_backend.py); each step hands
the graph a window of it and writes back the K/V the graph returns.
"""
from __future__ import annotations

import numpy as np

from dsflow.artifacts.manifest import Manifest
from dsflow.runtime.slot_backend import SlotBackend
from dsflow.runtime.worker_protocol import THREADS_ENV


def init_mindspore(tp: int) -> None:
    """Graph mode on CPU; with tp > 1 join the cluster and create the group the graphs use.

    Exported graphs name `hccl_world_group` (see graphs.layers.WORLD_GROUP); on CPU the
    world group is `mccl_world_group`, so an alias over all ranks is created. Kernel
    threads are capped at the rank's share of the cores (the cluster sets
    DSFLOW_THREADS): tp ranks each spawning a thread per core oversubscribe the CPU.
    """
    import os
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    if os.environ.get(THREADS_ENV):
        ms.set_context(runtime_num_threads=int(os.environ[THREADS_ENV]))
    if tp > 1:
        from mindspore.communication import create_group, get_group_size, init
        from dsflow.graphs.layers import WORLD_GROUP
        init()
        create_group(WORLD_GROUP, list(range(get_group_size())))


def share_weights(a, b) -> None:
    """Point graph `a`'s parameters at graph `b`'s tensors, so the weights are held once.

    Each MindIR carries its own copy of the weights; loading prefill and decode costs
    two copies (for a 125M-parameter model: 1.67 GB RSS, 1.21 GB once shared). The
    graphs were exported from one model, so names, shapes and dtypes match one to one.
    """
    pa, pb = a.parameters_dict(), b.parameters_dict()
    if set(pa) != set(pb):
        raise RuntimeError("prefill and decode graphs hold different parameters; "
                           "rebuild the artifacts")
    for name, p in pa.items():
        q = pb[name]
        if p.shape != q.shape or p.dtype != q.dtype:
            raise RuntimeError(f"parameter {name!r} differs between prefill and decode graphs")
        p.set_data(q)


class MindSporeBackend(SlotBackend):
    def __init__(self, manifest: Manifest, rank: int):
        super().__init__(manifest)
        import mindspore as ms
        from mindspore import nn
        self._ms = ms
        self.graphs = {kind: nn.GraphCell(ms.load(str(manifest.graph_path(rank, kind))))
                       for kind in ("prefill", "decode")}
        share_weights(self.graphs["prefill"], self.graphs["decode"])

    def _run(self, kind: str, inputs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        # from_numpy shares the array's memory: the window is not copied again
        outs = self.graphs[kind](*[self._ms.Tensor.from_numpy(a) for a in inputs])
        return tuple(o.asnumpy() for o in outs)
