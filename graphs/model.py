"""DeepSeek-Coder (Llama architecture) for one tensor-parallel rank, in MindSpore.

The cell tree mirrors the HF module tree (model.layers.N.self_attn.q_proj, ...), so
parameter names are the checkpoint's tensor names and loading is a by-name match
against the tensor-parallel plan. `PrefillGraph` and `DecodeGraph` wrap one
`RankModel` (without adding a name prefix) with the signatures of
`graphs.signatures`; each is exported to its own MindIR.

Attention is grouped-query without repeating K/V: the query heads of one KV head
are folded into the row axis ([batch, kv_heads, groups*seq, head_dim]) so one batched
matmul per layer serves the whole group (HF's repeat_kv maps query head h to KV head
h // groups; folding contiguous heads preserves exactly that mapping).
"""
from __future__ import annotations

import math

from typing import Iterable

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .config import ModelConfig
from .layers import MASK_VALUE, WORLD_GROUP, Embedding, Linear, RMSNorm, Rotary
from .tp_plan import padded_vocab

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


class RankAllReduce(nn.Cell):
    """Sum of the partial results of row-parallel layers; identity at tp=1."""

    def __init__(self, tp: int):
        super().__init__()
        self.tp = tp
        self.op = ops.AllReduce(group=WORLD_GROUP) if tp > 1 else None

    def construct(self, x):
        if self.tp > 1:
            return self.op(x)
        return x


class Attention(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp: int, dtype):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads = cfg.num_heads // tp
        self.kv_heads = cfg.num_kv_heads // tp
        self.groups = cfg.num_groups
        self.head_dim = hd
        self.scale = 1.0 / math.sqrt(hd)
        self.q_proj = Linear(self.heads * hd, h, dtype)
        self.k_proj = Linear(self.kv_heads * hd, h, dtype)
        self.v_proj = Linear(self.kv_heads * hd, h, dtype)
        self.o_proj = Linear(h, self.heads * hd, dtype)
        self.all_reduce = RankAllReduce(tp)
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.pv_matmul = ops.BatchMatMul()
        self.reduce_max = ops.ReduceMax(keep_dims=True)
        self.reduce_sum = ops.ReduceSum(keep_dims=True)

    def qkv(self, h, rotary, cos, sin):
        """h [tokens, hidden] -> q [tokens, heads, hd], k/v [tokens, kv_heads, hd]."""
        q = ops.reshape(self.q_proj(h), (-1, self.heads, self.head_dim))
        k = ops.reshape(self.k_proj(h), (-1, self.kv_heads, self.head_dim))
        v = ops.reshape(self.v_proj(h), (-1, self.kv_heads, self.head_dim))
        return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """q [b, kv_heads, groups*s, hd], k/v [b, kv_heads, t, hd], mask broadcastable
        to [b, kv_heads, groups*s, t] (True = attend) -> [b, kv_heads, groups*s, hd]."""
        scores = self.qk_matmul(q, k) * self.scale
        scores = ops.select(mask, scores, ops.full_like(scores, MASK_VALUE))
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        return self.pv_matmul(probs, v)

    def output(self, attn):
        """attn [tokens, heads*hd] -> [tokens, hidden], summed over ranks."""
        return self.all_reduce(self.o_proj(attn))

    def prefill(self, h, batch, seq, rotary, cos, sin, causal):
        """h [batch*seq, hidden] -> (out, k, v) with k/v [batch, kv_heads, seq, hd]."""
        q, k, v = self.qkv(h, rotary, cos, sin)
        q = ops.transpose(ops.reshape(q, (batch, seq, self.heads, self.head_dim)), (0, 2, 1, 3))
        k = ops.transpose(ops.reshape(k, (batch, seq, self.kv_heads, self.head_dim)), (0, 2, 1, 3))
        v = ops.transpose(ops.reshape(v, (batch, seq, self.kv_heads, self.head_dim)), (0, 2, 1, 3))
        q = ops.reshape(q, (batch, self.kv_heads, self.groups * seq, self.head_dim))
        out = self.attend(q, k, v, causal)
        out = ops.reshape(out, (batch, self.heads, seq, self.head_dim))
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, self.heads * self.head_dim))
        return self.output(out), k, v

    def decode(self, h, rotary, cos, sin, k_cache, v_cache, visible):
        """h [batch, hidden]; caches [batch, kv_heads, kv_len, hd] holding positions
        before this token (`visible` [batch, 1, 1, kv_len] marks them). The new token's
        K/V are attended separately and returned, not written: the caller writes all
        layers with one scatter (a per-layer write copied the cache 2 more times)."""
        q, k, v = self.qkv(h, rotary, cos, sin)
        q = ops.reshape(q, (-1, self.kv_heads, self.groups, self.head_dim))
        k_new = ops.expand_dims(k, 2)  # [b, kv_heads, 1, hd]
        v_new = ops.expand_dims(v, 2)
        old = self.qk_matmul(q, k_cache) * self.scale  # [b, kv_heads, groups, kv_len]
        old = ops.select(visible, old, ops.full_like(old, MASK_VALUE))
        new = self.reduce_sum(q * k_new, -1) * self.scale  # [.., groups, 1]
        # softmax over [old, new] without concatenating (no dynamic slicing afterwards)
        top = ops.maximum(self.reduce_max(old, -1), new)
        e_old = ops.exp(old - top)
        e_new = ops.exp(new - top)
        denom = self.reduce_sum(e_old, -1) + e_new
        out = (self.pv_matmul(e_old, v_cache) + e_new * v_new) / denom
        out = self.output(ops.reshape(out, (-1, self.heads * self.head_dim)))
        return out, k, v


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate/up column- and down row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: int, dtype):
        super().__init__()
        ffn = cfg.intermediate_size // tp
        self.gate_proj = Linear(ffn, cfg.hidden_size, dtype)
        self.up_proj = Linear(ffn, cfg.hidden_size, dtype)
        self.down_proj = Linear(cfg.hidden_size, ffn, dtype)
        self.all_reduce = RankAllReduce(tp)

    def construct(self, x):
        return self.all_reduce(self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp: int, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, tp, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, tp, dtype)

    def finish(self, x, attn_out):
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x, batch, seq, rotary, cos, sin, causal):
        out, k, v = self.self_attn.prefill(self.input_layernorm(x), batch, seq, rotary,
                                           cos, sin, causal)
        return self.finish(x, out), k, v

    def decode(self, x, rotary, cos, sin, k_cache, v_cache, visible):
        out, k, v = self.self_attn.decode(self.input_layernorm(x), rotary, cos, sin,
                                          k_cache, v_cache, visible)
        return self.finish(x, out), k, v


class LlamaModel(nn.Cell):
    def __init__(self, cfg: ModelConfig, tp: int, dtype):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, tp, dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class RankModel(nn.Cell):
    """One rank's share of the model; parameter names are the HF checkpoint names."""

    def __init__(self, cfg: ModelConfig, tp: int, dtype: str = "float32"):
        super().__init__()
        self.cfg = cfg
        self.dtype = DTYPES[dtype]
        self.groups = cfg.num_groups
        self.model = LlamaModel(cfg, tp, self.dtype)
        self.lm_head = Linear(padded_vocab(cfg, tp) // tp, cfg.hidden_size, self.dtype)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)

    def load(self, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        """Fill every parameter from (HF name, this rank's array) pairs, checking shapes."""
        params = {p.name: p for p in self.get_parameters()}
        missing = set(params)
        for name, arr in tensors:
            if name not in params:
                raise KeyError(f"tensor {name!r} has no parameter in the rank graph")
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"tensor {name!r}: rank shape {list(arr.shape)} != "
                                 f"parameter shape {list(p.shape)}")
            p.set_data(Tensor(arr, dtype=self.dtype))
            missing.discard(name)
        if missing:
            raise KeyError(f"no data for parameters: {sorted(missing)[:3]}")

    def cos_sin(self, positions):
        cos, sin = self.rotary.cos_sin(positions)
        return cos.astype(self.dtype), sin.astype(self.dtype)

    def logits(self, x):
        return self.lm_head(self.model.norm(x)).astype(ms.float32)


def _iota_like(t):
    """0, 1, ..., n-1 for a 1-D int tensor of length n (works with dynamic n)."""
    return ops.cumsum(ops.ones_like(t), 0) - 1


class PrefillGraph(nn.Cell):
    """(input_ids [b, s], valid_length [b]) -> (logits of each last real token, K, V).

    Prompts are right-padded; with a causal mask a real token never sees padding, so
    no padding mask is needed. Only the last real token of each prompt goes through
    the lm_head.
    """

    def __init__(self, net: RankModel):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, valid_length):
        m = self.net
        batch, seq = ops.shape(input_ids)
        pos = _iota_like(input_ids[0])
        causal = ops.expand_dims(pos, 1) >= ops.expand_dims(pos, 0)  # [s, s]
        causal = ops.reshape(ops.tile(ops.expand_dims(causal, 0), (m.groups, 1, 1)),
                             (1, 1, -1, seq))  # [1, 1, groups*s, s]
        flat_pos = ops.reshape(ops.tile(ops.expand_dims(pos, 0), (batch, 1)), (-1,))
        cos, sin = m.cos_sin(flat_pos)
        x = m.model.embed_tokens(ops.reshape(input_ids, (-1,)))
        keys = ()
        values = ()
        for layer in m.model.layers:
            x, k, v = layer.prefill(x, batch, seq, m.rotary, cos, sin, causal)
            keys = keys + (k,)
            values = values + (v,)
        last = _iota_like(valid_length) * seq + valid_length - 1
        logits = m.logits(ops.gather(x, last, 0))
        return logits, ops.stack(keys, 0), ops.stack(values, 0)


class DecodeGraph(nn.Cell):
    """(input_ids [b], positions [b], K, V) -> (logits [b, vocab/tp], K', V').

    Position positions[b] of each cache is overwritten with the new token's K/V, and
    attention sees positions 0..positions[b]; anything a padded prefill left beyond
    a sequence's length is overwritten before it becomes visible.
    """

    def __init__(self, net: RankModel):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, positions, key_cache, value_cache):
        m = self.net
        # One Unstack per cache, never `cache[i]`: on CPU a dynamic-shape StridedSlice of
        # the cache per layer cost 2.5 ms each (30x an Unstack of all layers).
        key_layers = ops.unstack(key_cache, 0)
        value_layers = ops.unstack(value_cache, 0)
        slots = _iota_like(key_layers[0][0, 0, :, 0])  # [kv_len]
        visible = ops.expand_dims(slots, 0) < ops.expand_dims(positions, 1)  # [b, kv_len]
        visible = ops.expand_dims(ops.expand_dims(visible, 1), 1)  # [b, 1, 1, kv_len]
        cos, sin = m.cos_sin(positions)
        x = m.model.embed_tokens(input_ids)
        keys = ()
        values = ()
        i = 0
        for layer in m.model.layers:
            x, k, v = layer.decode(x, m.rotary, cos, sin, key_layers[i], value_layers[i],
                                   visible)
            keys = keys + (k,)
            values = values + (v,)
            i = i + 1
        index = self._write_index(positions)
        key_cache = ops.tensor_scatter_update(key_cache, index, self._updates(keys))
        value_cache = ops.tensor_scatter_update(value_cache, index, self._updates(values))
        return m.logits(x), key_cache, value_cache

    def _write_index(self, positions):
        """[(layer, b, head, positions[b]) for every layer, b, head] -> [L*b*heads, 4]."""
        n_layers = len(self.net.model.layers)
        heads = self.net.model.layers[0].self_attn.kv_heads
        b = ops.reshape(_iota_like(positions), (1, -1, 1))
        pos = ops.reshape(positions, (1, -1, 1))
        layer = ops.reshape(_iota_like(ops.ones((n_layers,), ms.int32)), (-1, 1, 1))
        head = ops.reshape(_iota_like(ops.ones((heads,), ms.int32)), (1, 1, -1))
        zero = ops.zeros_like(layer + b + head)
        index = ops.stack((layer + zero, b + zero, head + zero, pos + zero), -1)
        return ops.reshape(index, (-1, 4))

    def _updates(self, per_layer):
        """Tuple of [b, kv_heads, hd] per layer -> [L*b*kv_heads, hd] in index order."""
        stacked = ops.stack(per_layer, 0)
        return ops.reshape(stacked, (-1, ops.shape(stacked)[-1]))


GRAPH_CLASSES = {"prefill": PrefillGraph, "decode": DecodeGraph}
