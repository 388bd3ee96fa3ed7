"""Graph signatures: the inputs and outputs of the prefill and decode graphs, defined once.

Export builds its placeholders from these, the manifest records them, the workers check
their arguments against them and the docs print them. Dimensions are ints or the names
of dynamic axes.

KV cache layout (both graphs): [layers, batch, kv_heads / tp, kv_len, head_dim], keys
and values in two tensors, as in the MindSpore Lite Qwen3 example. `kv_len` is dynamic:
the runtime sizes the cache per request (padded prompt + max new tokens, at most
`max_seq_len`), so short requests neither allocate nor attend over a 16K window.
Prefill returns the cache for the prompt positions only (kv_len = seq); the runtime
pads it once to the request's length. Decode writes position `positions[b]` of
sequence b and returns the whole updated cache, which is fed back on the next step.

Inputs are listed in name order. GE (the Ascend graph engine) pairs the entries of
`ge.inputShape` and the values of each dynamic-dims gear with the graph's Data nodes by
position: current GE sorts the nodes by name first (CANN ge
compiler/graph/preprocess/multi_batch_options.cc, SortDataNodesByName), older GE took
them in graph order. With graph order = name order the two agree, and the Lite configs
(export/pipeline/lite_build.py) can follow the signature; `check_input_order` enforces it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import rank_sizes

Dim = Union[int, str]

BATCH, SEQ, KV_LEN = "batch", "seq", "kv_len"
CACHE_LAYOUT = ("layers", BATCH, "kv_heads_per_rank", KV_LEN, "head_dim")
GRAPH_KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def placeholder_shape(self) -> list:
        """Shape for export: dynamic axes become None."""
        return [d if isinstance(d, int) else None for d in self.shape]


@dataclass(frozen=True)
class GraphSignature:
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


def check_input_order(sig: GraphSignature) -> None:
    """Refuse a signature whose inputs are not in name order (see the module docstring);
    names compare bytewise, as GE's std::string does."""
    names = [t.name for t in sig.inputs]
    if names != sorted(names, key=str.encode):
        raise ValueError(f"{sig.kind} graph inputs {names} are not in name order; GE pairs "
                         "ge.inputShape with Data nodes sorted by name (graphs/signatures.py)")


def cache_shape(cfg: ModelConfig, tp: int, kv_len: Dim = KV_LEN) -> tuple[Dim, ...]:
    sizes = rank_sizes(cfg, tp)
    return (sizes.layers, BATCH, sizes.kv_heads, kv_len, sizes.head_dim)


def graph_signature(kind: str, cfg: ModelConfig, tp: int, dtype: str) -> GraphSignature:
    """The signature of one rank's graph. `dtype` is the KV-cache dtype
    (graphs.kernels.cache_dtype(target, weight dtype)); logits are always fp32."""
    logits = TensorSpec("logits", (BATCH, rank_sizes(cfg, tp).vocab), "float32")
    if kind == "prefill":
        inputs = (TensorSpec("input_ids", (BATCH, SEQ), "int32"),
                  TensorSpec("valid_length", (BATCH,), "int32"))
        kv = cache_shape(cfg, tp, SEQ)
        outputs = (logits, TensorSpec("key_cache", kv, dtype),
                   TensorSpec("value_cache", kv, dtype))
    elif kind == "decode":
        kv = cache_shape(cfg, tp)
        inputs = (TensorSpec("input_ids", (BATCH,), "int32"),
                  TensorSpec("key_cache", kv, dtype),
                  TensorSpec("positions", (BATCH,), "int32"),
                  TensorSpec("value_cache", kv, dtype))
        outputs = (logits, TensorSpec("key_cache", kv, dtype),
                   TensorSpec("value_cache", kv, dtype))
    else:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")
    sig = GraphSignature(kind, inputs, outputs)
    check_input_order(sig)
    return sig
