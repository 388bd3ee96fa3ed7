"""DeepSeek-Coder (Llama architecture) for one tensor-parallel rank, in MindSpore.

The cell tree mirrors the HF module tree (model.layers.N.self_attn.q_proj, ...), so
parameter names are the checkpoint's tensor names and loading is a by-name match
against the tensor-parallel plan. `PrefillGraph` and `DecodeGraph` wrap one
`RankModel` (without adding a name prefix) with the signatures of
`graphs.signatures`; each is exported to its own MindIR.

`target` picks the kernel set (graphs/kernels/__init__.py): "cpu" builds the portable graphs
from plain ops, "ascend" the same graphs from MindSpore's fused Ascend operators. The
parameters, the signatures and the data flow between kernels are identical.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.kernels import kernel_set
from dsflow.graphs.signatures import RESIDENT, WINDOW
from dsflow.graphs.layers import Embedding, Linear, RankAllReduce, RMSNorm, iota_like
from dsflow.graphs.tp_plan import PlanMismatchError, rank_sizes, weight_specs

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


class Attention(nn.Cell):
    """q/k/v/o projections of one layer (HF names); the attention itself is the kernel's."""

    def __init__(self, cfg: ModelConfig, tp: int, dtype):
        super().__init__()
        h, hd, sizes = cfg.hidden_size, cfg.head_dim, rank_sizes(cfg, tp)
        self.heads = sizes.heads
        self.kv_heads = sizes.kv_heads
        self.head_dim = hd
        self.q_proj = Linear(self.heads * hd, h, dtype)
        self.k_proj = Linear(self.kv_heads * hd, h, dtype)
        self.v_proj = Linear(self.kv_heads * hd, h, dtype)
        self.o_proj = Linear(h, self.heads * hd, dtype)
        self.all_reduce = RankAllReduce(tp)

    def qkv(self, h, seq, rotary, cos, sin):
        """h [tokens, hidden] -> q [b, seq, heads, hd], k/v [b, seq, kv_heads, hd]."""
        q = ops.reshape(self.q_proj(h), (-1, seq, self.heads, self.head_dim))
        k = ops.reshape(self.k_proj(h), (-1, seq, self.kv_heads, self.head_dim))
        v = ops.reshape(self.v_proj(h), (-1, seq, self.kv_heads, self.head_dim))
        return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin), v

    def output(self, attn):
        """attn [tokens, heads*hd] -> [tokens, hidden], summed over ranks."""
        return self.all_reduce(self.o_proj(attn))

    def prefill(self, h, seq, rotary, cos, sin, kernel, k_past, v_past, ctx, mask):
        """h [batch*seq, hidden] -> (out, k, v) with k/v [batch, kv_heads, seq, hd]."""
        q, k, v = self.qkv(h, seq, rotary, cos, sin)
        out, k, v = kernel.prefill(q, k, v, k_past, v_past, ctx, mask)
        return self.output(out), k, v

    def decode(self, h, rotary, cos, sin, kernel, k_past, v_past, ctx):
        """h [batch, hidden] -> (out, k, v) with k/v [batch, kv_heads, 1, hd]."""
        q, k, v = self.qkv(h, 1, rotary, cos, sin)
        out, k, v = kernel.decode(q, k, v, k_past, v_past, ctx)
        return self.output(out), k, v


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate/up column- and down row-parallel.

    Not the fused Swiglu operator on Ascend: it needs [gate|up] as one tensor, i.e. one
    concatenated weight (new parameter names) or a concat per step (docs/ASCEND_GRAPHS.md)."""

    def __init__(self, cfg: ModelConfig, tp: int, dtype):
        super().__init__()
        ffn = rank_sizes(cfg, tp).ffn
        self.gate_proj = Linear(ffn, cfg.hidden_size, dtype)
        self.up_proj = Linear(ffn, cfg.hidden_size, dtype)
        self.down_proj = Linear(cfg.hidden_size, ffn, dtype)
        self.all_reduce = RankAllReduce(tp)

    def construct(self, x):
        return self.all_reduce(self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp: int, dtype, norm_kernel: type):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, dtype, norm_kernel(eps, dtype))
        self.self_attn = Attention(cfg, tp, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, dtype, norm_kernel(eps, dtype))
        self.mlp = MLP(cfg, tp, dtype)

    def finish(self, x, attn_out):
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x, seq, rotary, cos, sin, kernel, k_past, v_past, ctx, mask):
        out, k, v = self.self_attn.prefill(self.input_layernorm(x), seq, rotary, cos, sin,
                                           kernel, k_past, v_past, ctx, mask)
        return self.finish(x, out), k, v

    def decode(self, x, rotary, cos, sin, kernel, k_past, v_past, ctx):
        out, k, v = self.self_attn.decode(self.input_layernorm(x), rotary, cos, sin, kernel,
                                          k_past, v_past, ctx)
        return self.finish(x, out), k, v


class LlamaModel(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp: int, dtype, norm_kernel: type):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, tp, dtype, norm_kernel)
                                   for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, dtype, norm_kernel(cfg.rms_norm_eps, dtype))


def to_tensor(arr: np.ndarray, dtype) -> Tensor:
    """A weight as a MindSpore tensor of `dtype`.

    export/ delivers bf16 as uint16 bit patterns (numpy has no bf16): those are
    reinterpreted, never converted, or every weight would become its bit pattern's
    integer value. Anything else is converted (fp32 -> bf16 rounds to nearest even)."""
    if dtype == ms.bfloat16 and arr.dtype == np.uint16:
        from mindspore.common import np_dtype
        return Tensor(arr.view(np_dtype.bfloat16))
    return Tensor(arr, dtype=dtype)


class RankModel(nn.Cell):
    """One rank's share of the model; parameter names are the HF checkpoint names.

    target "cpu" (portable ops, runs here) or "ascend" (fused Ascend operators, export
    only on CPU; dtype bfloat16 or float16). Same parameters and signatures for both."""

    def __init__(self, cfg: ModelConfig, tp: int, dtype: str = "float32", target: str = "cpu"):
        super().__init__()
        kernels = kernel_set(target, dtype)
        self.cfg = cfg
        self.tp = tp
        self.target = target
        self.dtype = DTYPES[dtype]
        self.model = LlamaModel(cfg, tp, self.dtype, kernels.rms_norm)
        self.lm_head = Linear(rank_sizes(cfg, tp).vocab, cfg.hidden_size, self.dtype)
        self.rotary = kernels.rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                     self.dtype)
        self.attention = kernels.attention(cfg, tp)
        self._check_against_plan(tp)

    def _check_against_plan(self, tp: int) -> None:
        """Every parameter exists in the TP plan with the plan's per-rank shape."""
        params = {p.name: tuple(p.shape) for p in self.get_parameters()}
        for spec in weight_specs(self.cfg):
            shape = params.pop(spec.name, None)
            if shape is None:
                raise PlanMismatchError(f"tensor {spec.name}: in the TP plan but not in the "
                                        "rank model")
            if shape != spec.rank_shape(tp):
                raise PlanMismatchError(f"tensor {spec.name}: rank model shape {list(shape)} "
                                        f"!= TP plan shape {list(spec.rank_shape(tp))}")
        if params:
            raise PlanMismatchError(f"tensor {sorted(params)[0]}: in the rank model but not "
                                    "in the TP plan")

    def load(self, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        """Fill every parameter from (HF name, this rank's array) pairs, checking shapes."""
        params = {p.name: p for p in self.get_parameters()}
        missing = set(params)
        for name, arr in tensors:
            if name not in params:
                raise PlanMismatchError(f"tensor {name}: has no parameter in the rank graph")
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise PlanMismatchError(f"tensor {name}: rank shape {list(arr.shape)} != "
                                        f"parameter shape {list(p.shape)}")
            p.set_data(to_tensor(arr, self.dtype))
            missing.discard(name)
        if missing:
            raise PlanMismatchError(f"tensor {sorted(missing)[0]}: no data for it "
                                    f"({len(missing)} parameter(s) missing)")

    def logits(self, x):
        return self.lm_head(self.model.norm(x)).astype(ms.float32)

    def prefill_forward(self, input_ids, key_window, start, valid_length, value_window):
        """The prefill computation over a window (both cache modes): logits of each row's
        last real token, and the chunk's K/V [layers, b, kv_heads, s, hd].

        A method, not a free function taking the model: MindSpore caches a parsed free
        function across calls, and one shared by the portable and Ascend models resolved
        the second model's kernels to the first's (seen exporting both in one process)."""
        seq = ops.shape(input_ids)[1]
        pos = iota_like(input_ids[0])
        mask = self.attention.prefill_mask(pos)
        positions = ops.expand_dims(start, 1) + ops.expand_dims(pos, 0)  # [b, s]
        cos, sin = self.rotary.cos_sin(positions)  # [b, s, 1, hd]
        ctx = self.attention.window_context(key_window, value_window, start)
        x = self.model.embed_tokens(ops.reshape(input_ids, (-1,)))
        keys = ()
        values = ()
        i = 0
        for layer in self.model.layers:
            k_past, v_past = self.attention.layer_cache(ctx, i)
            x, k, v = layer.prefill(x, seq, self.rotary, cos, sin, self.attention, k_past, v_past,
                                    ctx, mask)
            keys = keys + (k,)
            values = values + (v,)
            i = i + 1
        logits = self.logits(ops.gather(x, last_token_rows(valid_length, seq), 0))
        key, value = self.attention.window_end(keys, values)
        return logits, key, value

    def decode_forward(self, input_ids, key_window, positions, value_window):
        """The decode computation over a window (both cache modes): logits and the token's
        K/V [layers, b, kv_heads, 1, hd]."""
        ctx = self.attention.window_context(key_window, value_window, positions)
        cos, sin = self.rotary.cos_sin(ops.expand_dims(positions, 1))  # [b, 1, 1, hd]
        x = self.model.embed_tokens(input_ids)
        keys = ()
        values = ()
        i = 0
        for layer in self.model.layers:
            k_past, v_past = self.attention.layer_cache(ctx, i)
            x, k, v = layer.decode(x, self.rotary, cos, sin, self.attention, k_past, v_past, ctx)
            keys = keys + (k,)
            values = values + (v,)
            i = i + 1
        key, value = self.attention.window_end(keys, values)
        return self.logits(x), key, value


def last_token_rows(valid_length, seq):
    """Row of each prompt's last real token in the flattened [batch * seq] activations:
    b * seq + valid_length[b] - 1, in int32 like every index (never the compute dtype).
    A padding row of the resident graphs has valid_length 0: it reads its own first
    row, never row -1 (a negative gather index, which a device kernel may reject)."""
    last = ops.maximum(valid_length - 1, ops.zeros_like(valid_length))
    return iota_like(valid_length) * seq + last


class PrefillGraph(nn.Cell):
    """(input_ids [b, s], key_window, start [b], valid_length [b], value_window) ->
    (logits of each row's last real token, the chunk's K, V); inputs in name order.

    Row b holds tokens start[b] .. start[b] + valid_length[b] - 1 of its sequence,
    right-padded; they attend to window positions < start[b] and causally to each
    other, so a real token never sees padding. Only the last real token of each row
    goes through the lm_head.
    """

    def __init__(self, net: RankModel):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, key_window, start, valid_length, value_window):
        return self.net.prefill_forward(input_ids, key_window, start, valid_length,
                                        value_window)


class DecodeGraph(nn.Cell):
    """(input_ids [b], key_window, positions [b], value_window) -> (logits [b, vocab/tp],
    K, V); inputs in name order like every signature (graphs/signatures.py).

    Row b's token sits at positions[b] and attends to window positions < positions[b]
    and itself; its K/V [layers, b, kv_heads, 1, hd] are returned for the worker to
    write into the row's slot.
    """

    def __init__(self, net: RankModel):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, key_window, positions, value_window):
        return self.net.decode_forward(input_ids, key_window, positions, value_window)


class SlotWriter(nn.Cell):
    """The resident graphs' cache plumbing, in plain MindSpore ops shared by both kernel
    sets (so the CPU run of the portable graphs checks what the Ascend graphs do).

    `rows` gathers the batch's slots: [layers, slots, ...] -> [layers, b, ...], a window
    whose kv_len is the capacity. `write` returns the whole cache with the new K/V
    [layers, b, kv_heads, s, hd] scattered in: entry (b, j) goes to position
    positions[b, j] of slot slot_ids[b] if valid[b, j], otherwise the value already at
    (slot_ids[b], positions[b, j] mod capacity) is written back. So every index of the
    one TensorScatterUpdate is distinct (the rows' slots are distinct, and a row's s
    positions are distinct modulo the capacity when s <= capacity, which the runtime
    guarantees), and its result does not depend on the order in which duplicates
    would be applied, which TensorScatterUpdate leaves undefined. Padding rows
    (valid all False, a slot no real row uses) and padding columns change nothing.
    """

    def __init__(self, layers: int, kv_heads: int):
        super().__init__()
        self.layer_ids = Tensor(np.arange(layers, dtype=np.int32).reshape(layers, 1, 1, 1))
        self.head_ids = Tensor(np.arange(kv_heads, dtype=np.int32).reshape(1, 1, kv_heads, 1))

    def rows(self, cache, slot_ids):
        return ops.gather(cache, slot_ids, 1)

    def indices(self, cache, slot_ids, positions, new):
        """[layers, b, kv_heads, s, 4] int32: (layer, slot, head, position mod capacity)."""
        capacity = ops.cast(ops.dyn_shape(cache)[3], ms.int32)
        zero = ops.zeros_like(new[:, :, :, :, 0], dtype=ms.int32)  # [layers, b, heads, s]
        slot = ops.reshape(slot_ids, (1, -1, 1, 1))
        pos = ops.expand_dims(ops.expand_dims(ops.floor_mod(positions, capacity), 0), 2)
        return ops.stack((self.layer_ids + zero, slot + zero, self.head_ids + zero,
                          pos + zero), -1)

    def write(self, cache, slot_ids, positions, valid, new):
        """positions, valid [b, s]; new [layers, b, kv_heads, s, hd] -> updated cache."""
        new = ops.cast(new, cache.dtype)
        index = self.indices(cache, slot_ids, positions, new)
        old = ops.gather_nd(cache, index)
        keep = ops.expand_dims(ops.expand_dims(ops.expand_dims(valid, 0), 2), 4)
        return ops.tensor_scatter_update(cache, index, ops.select(keep, new, old))


def _slot_writer(net: RankModel) -> SlotWriter:
    sizes = rank_sizes(net.cfg, net.tp)
    return SlotWriter(sizes.layers, sizes.kv_heads)


class ResidentPrefillGraph(nn.Cell):
    """(input_ids [b, s], key_cache, slot_ids [b], start [b], valid_length [b],
    value_cache) -> (logits, key_cache, value_cache): the window prefill over the
    gathered slots, then the chunk's valid K/V written into the whole cache
    (graphs/signatures.py, resident mode). Padding rows have valid_length 0."""

    def __init__(self, net: RankModel):
        super().__init__(auto_prefix=False)
        self.net = net
        self.slots = _slot_writer(net)

    def construct(self, input_ids, key_cache, slot_ids, start, valid_length, value_cache):
        w = self.slots
        logits, key, value = self.net.prefill_forward(input_ids, w.rows(key_cache, slot_ids),
                                                      start, valid_length,
                                                      w.rows(value_cache, slot_ids))
        pos = iota_like(input_ids[0])
        positions = ops.expand_dims(start, 1) + ops.expand_dims(pos, 0)  # [b, s]
        valid = ops.expand_dims(pos, 0) < ops.expand_dims(valid_length, 1)
        return (logits, w.write(key_cache, slot_ids, positions, valid, key),
                w.write(value_cache, slot_ids, positions, valid, value))


class ResidentDecodeGraph(nn.Cell):
    """(input_ids [b], key_cache, positions [b], slot_ids [b], value_cache) -> (logits,
    key_cache, value_cache). A row with position -1 is padding: it attends as if at 0
    (harmless: its logits are dropped, and no kernel sees a negative offset) and
    writes nothing."""

    def __init__(self, net: RankModel):
        super().__init__(auto_prefix=False)
        self.net = net
        self.slots = _slot_writer(net)

    def construct(self, input_ids, key_cache, positions, slot_ids, value_cache):
        w = self.slots
        at = ops.maximum(positions, ops.zeros_like(positions))
        logits, key, value = self.net.decode_forward(input_ids, w.rows(key_cache, slot_ids),
                                                     at, w.rows(value_cache, slot_ids))
        column = ops.expand_dims(positions, 1)  # [b, 1]
        valid = column >= 0
        return (logits, w.write(key_cache, slot_ids, column, valid, key),
                w.write(value_cache, slot_ids, column, valid, value))


GRAPH_CLASSES = {("prefill", WINDOW): PrefillGraph, ("decode", WINDOW): DecodeGraph,
                 ("prefill", RESIDENT): ResidentPrefillGraph,
                 ("decode", RESIDENT): ResidentDecodeGraph}
