"""Worker backend on MindSpore itself: runs the exported MindIR through `nn.GraphCell`.

The KV cache lives in this process as MindSpore tensors: the decode graph's output
cache is passed straight back as the next step's input, never converted to numpy.
"""
from __future__ import annotations

import numpy as np

from dsflow.artifacts.manifest import Manifest
from dsflow.runtime.kv_cache import extend_cache


THREADS_ENV = "DSFLOW_THREADS"


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


class MindSporeBackend:
    def __init__(self, manifest: Manifest, rank: int):
        import mindspore as ms
        from mindspore import nn
        self._ms = ms
        self.prefill_graph = nn.GraphCell(ms.load(str(manifest.graph_path(rank, "prefill"))))
        self.decode_graph = nn.GraphCell(ms.load(str(manifest.graph_path(rank, "decode"))))
        share_weights(self.prefill_graph, self.decode_graph)
        self.key_cache = None
        self.value_cache = None

    def prefill(self, input_ids: np.ndarray, valid_length: np.ndarray, kv_len: int) -> np.ndarray:
        T = self._ms.Tensor
        logits, k, v = self.prefill_graph(T(input_ids), T(valid_length))
        self.key_cache = T(extend_cache(k.asnumpy(), kv_len))
        self.value_cache = T(extend_cache(v.asnumpy(), kv_len))
        return logits.asnumpy()

    def decode(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.key_cache is None:
            raise RuntimeError("decode before prefill: no KV cache")
        T = self._ms.Tensor
        logits, self.key_cache, self.value_cache = self.decode_graph(
            T(input_ids), self.key_cache, T(positions), self.value_cache)
        return logits.asnumpy()

    def release(self) -> None:
        self.key_cache = self.value_cache = None
