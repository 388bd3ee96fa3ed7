"""Graph signatures: the inputs and outputs of the prefill and decode graphs, defined once.

Export builds its placeholders from these, the manifest records them, the workers check
their arguments against them and the docs print them. Dimensions are ints or the names
of dynamic axes.

The KV cache lives in the workers, in slots (runtime/slot_cache.py): `max_batch`
sequences of up to `capacity` positions each. In the "window" cache mode the graphs
never see the whole cache: each call receives a *window* of it, the first `kv_len`
positions of the slots taking part ([layers, batch, kv_heads / tp, kv_len, head_dim],
keys and values in two tensors), and returns only the K/V it computed, which the worker writes into the
slots. `kv_len` is the live length rounded up, so a step costs what the sequences
hold, not what the cache could hold; positions at or beyond a row's own length are
masked, so the rounding is never seen.

- prefill ("extend"): a chunk of `seq` tokens per row starting at position `start[b]`
  (right-padded, `valid_length[b]` real tokens) attends to the window's first
  `start[b]` positions and causally to itself. It returns the logits of each row's
  last real token and the chunk's K/V [layers, batch, kv_heads, seq, head_dim]. A
  prompt is fed as one or more chunks (chunked prefill: no seq x seq score matrix
  for a long prompt, and running decodes wait at most one chunk).
- decode: one token per row at `positions[b]`, attending to the window's first
  `positions[b]` positions and itself; returns logits and the token's K/V
  [layers, batch, kv_heads, 1, head_dim]. kv_len > every positions[b] (the Ascend
  kernels write the token into their copy of the window before attending).

Cache modes. The above is the "window" mode, used on CPU: the cache stays in host
numpy and a step copies only what its sequences hold. On a device that window would
cross PCIe every step, so the Ascend graphs use the "resident" mode instead: they take
the *whole* slot cache (key_cache / value_cache [layers, slots, kv_heads / tp,
capacity, head_dim], which never leaves the card) plus `slot_ids [batch]`, gather the
batch's slots in-graph (a window whose kv_len is the capacity: the masks already hide
positions beyond each row's length), and return logits plus the whole updated cache,
the new K/V scattered in at (slot_ids[b], position). The caller receives that into a
second cache pair and swaps the two (ping-pong: runtime/backends/lite.py).
- prefill: input_ids [batch, seq], key_cache, slot_ids, start, valid_length,
  value_cache. Entry (b, j) is written at position start[b] + j of slot slot_ids[b]
  when j < valid_length[b]; padding entries rewrite what is there (see
  graphs/model.py `SlotWriter.write`), so padded rows (valid_length 0, a slot of their own)
  change nothing.
- decode: input_ids [batch], key_cache, positions, slot_ids, value_cache; a row with
  position -1 is padding and writes nothing.
The cache layout is the window layout with `slots` for `batch`, for two reasons: the
gathered rows are exactly the window the attention kernels already take (no
transpose of the cache), and (layer, slot, kv_head, position) are its four leading
axes, so one TensorScatterUpdate per cache writes every layer's new K/V with
head_dim-long rows as the update slices. `slots` and `capacity` are named axes:
dynamic in an exported MindIR (a CPU resident build serves any --max-batch /
--max-seq-len), fixed by the Lite config for GE (export/pipeline/lite_build.py).

In-place mode ("inplace", the ONNX target: graphs/onnx_model.py). ONNX Runtime's
GroupQueryAttention reads a past K/V buffer [batch, kv_heads, capacity, head_dim] per
layer and writes the new K/V into its present output; when the caller binds past and
present to the same memory it writes in place and copies nothing. The worker's slot
cache is [layers, slots, kv_heads, capacity, head_dim], so a run of consecutive slots
is, per layer, one contiguous block that is bound as both (runtime/backends/onnxrt.py).
One graph serves prefill and decode (a decode step is a chunk of one token), so the
weights are loaded and prepacked once; the manifest lists it under both kinds.
- inputs: input_ids [batch, seq], past_key.<layer> ..., past_value.<layer> ...,
  start [batch], valid_length [batch] (layer numbers zero-padded, so name order is
  layer order). Row b's tokens sit at positions start[b].. and attend to
  positions < start[b] and causally to each other; the returned logits are those of
  its last real token (valid_length[b] - 1). Padding columns are written to the
  cache beyond the row's real tokens, where nothing reads them before a real token
  overwrites them, so start[b] + seq must fit the capacity.
- outputs: logits [batch, vocab / tp], present_key.<layer>, present_value.<layer>
  (the same buffers as the pasts).

Positions, starts and lengths are int32 whatever the compute dtype.

Inputs are listed in name order. MindSpore Lite matches the `ge.inputShape` entries of
its Ascend configs to the graph inputs by name (mindspore-lite ge_graph_executor.cc
UpdateGraphInputs; the MindIR loader strips the stored `graph:` prefix), so their order
is harmless there; name order keeps the values of each dynamic-dims gear (one per -1,
in entry order) in one fixed order, which GE's multibatch code also reads after
sorting its Data nodes by name (CANN multi_batch_options.cc SortDataNodesByName). The
Lite configs (export/pipeline/lite_build.py) follow the signature;
`check_input_order` enforces it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import rank_sizes

Dim = Union[int, str]

BATCH, SEQ, KV_LEN = "batch", "seq", "kv_len"
SLOTS, CAPACITY = "slots", "capacity"
CACHE_LAYOUT = ("layers", SLOTS, "kv_heads_per_rank", CAPACITY, "head_dim")
WINDOW_LAYOUT = ("layers", BATCH, "kv_heads_per_rank", KV_LEN, "head_dim")
GRAPH_KINDS = ("prefill", "decode")
WINDOW, RESIDENT, INPLACE = "window", "resident", "inplace"
CACHE_MODES = (WINDOW, RESIDENT, INPLACE)
INPLACE_LAYOUT = (BATCH, "kv_heads_per_rank", CAPACITY, "head_dim")


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
    cache_mode: str = WINDOW

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)


def check_input_order(sig: GraphSignature) -> None:
    """Refuse a signature whose inputs are not in name order (see the module docstring);
    names compare bytewise, as GE's std::string does."""
    names = [t.name for t in sig.inputs]
    if names != sorted(names, key=str.encode):
        raise ValueError(f"{sig.kind} graph inputs {names} are not in name order; GE pairs "
                         "gear values in name order (graphs/signatures.py)")


def cache_shape(cfg: ModelConfig, tp: int, kv_len: Dim = KV_LEN) -> tuple[Dim, ...]:
    """A window of the slot cache: [layers, batch, kv_heads / tp, kv_len, head_dim]."""
    sizes = rank_sizes(cfg, tp)
    return (sizes.layers, BATCH, sizes.kv_heads, kv_len, sizes.head_dim)


def resident_cache_shape(cfg: ModelConfig, tp: int) -> tuple[Dim, ...]:
    """The whole slot cache of one rank: [layers, slots, kv_heads / tp, capacity, head_dim]."""
    sizes = rank_sizes(cfg, tp)
    return (sizes.layers, SLOTS, sizes.kv_heads, CAPACITY, sizes.head_dim)


def check_cache_mode(cache_mode: str) -> None:
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache mode {cache_mode!r}: unknown (choose from "
                         f"{', '.join(CACHE_MODES)})")


def graph_signature(kind: str, cfg: ModelConfig, tp: int, dtype: str,
                    cache_mode: str = WINDOW) -> GraphSignature:
    """The signature of one rank's graph. `dtype` is the KV-cache dtype
    (graphs.kernels.cache_dtype(target, weight dtype)); logits are always fp32.
    `cache_mode` "window" or "resident" (module docstring)."""
    check_cache_mode(cache_mode)
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {GRAPH_KINDS}")
    if cache_mode == RESIDENT:
        sig = _resident_signature(kind, cfg, tp, dtype)
    elif cache_mode == INPLACE:
        sig = _inplace_signature(kind, cfg, tp, dtype)
    else:
        sig = _window_signature(kind, cfg, tp, dtype)
    check_input_order(sig)
    return sig


def _logits(cfg: ModelConfig, tp: int) -> TensorSpec:
    return TensorSpec("logits", (BATCH, rank_sizes(cfg, tp).vocab), "float32")


def _resident_signature(kind: str, cfg: ModelConfig, tp: int, dtype: str) -> GraphSignature:
    cache = (TensorSpec("key_cache", resident_cache_shape(cfg, tp), dtype),
             TensorSpec("value_cache", resident_cache_shape(cfg, tp), dtype))
    slot_ids = TensorSpec("slot_ids", (BATCH,), "int32")
    if kind == "prefill":
        inputs = (TensorSpec("input_ids", (BATCH, SEQ), "int32"), cache[0], slot_ids,
                  TensorSpec("start", (BATCH,), "int32"),
                  TensorSpec("valid_length", (BATCH,), "int32"), cache[1])
    else:
        inputs = (TensorSpec("input_ids", (BATCH,), "int32"), cache[0],
                  TensorSpec("positions", (BATCH,), "int32"), slot_ids, cache[1])
    return GraphSignature(kind, inputs, (_logits(cfg, tp), *cache), RESIDENT)


def _window_signature(kind: str, cfg: ModelConfig, tp: int, dtype: str) -> GraphSignature:
    window = (TensorSpec("key_window", cache_shape(cfg, tp), dtype),
              TensorSpec("value_window", cache_shape(cfg, tp), dtype))
    if kind == "prefill":
        inputs = (TensorSpec("input_ids", (BATCH, SEQ), "int32"), window[0],
                  TensorSpec("start", (BATCH,), "int32"),
                  TensorSpec("valid_length", (BATCH,), "int32"), window[1])
        new = cache_shape(cfg, tp, SEQ)
    else:
        inputs = (TensorSpec("input_ids", (BATCH,), "int32"), window[0],
                  TensorSpec("positions", (BATCH,), "int32"), window[1])
        new = cache_shape(cfg, tp, 1)
    outputs = (_logits(cfg, tp), TensorSpec("key", new, dtype), TensorSpec("value", new, dtype))
    return GraphSignature(kind, inputs, outputs)


def layer_tensor_names(prefix: str, layers: int) -> list[str]:
    """`prefix.<layer>` for every layer, zero-padded so that name order is layer order."""
    width = len(str(max(layers - 1, 0)))
    return [f"{prefix}.{i:0{width}d}" for i in range(layers)]


def _inplace_signature(kind: str, cfg: ModelConfig, tp: int, dtype: str) -> GraphSignature:
    """The ONNX graph (module docstring, in-place mode): the same for both kinds."""
    sizes = rank_sizes(cfg, tp)
    shape = (BATCH, sizes.kv_heads, CAPACITY, sizes.head_dim)

    def per_layer(prefix: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, shape, dtype) for n in layer_tensor_names(prefix, sizes.layers))
    inputs = (TensorSpec("input_ids", (BATCH, SEQ), "int32"), *per_layer("past_key"),
              *per_layer("past_value"), TensorSpec("start", (BATCH,), "int32"),
              TensorSpec("valid_length", (BATCH,), "int32"))
    return GraphSignature(kind, inputs, (_logits(cfg, tp), *per_layer("present_key"),
                                         *per_layer("present_value")), INPLACE)
