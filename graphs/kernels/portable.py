"""Portable kernel set: plain MindSpore ops that run on CPU (and anywhere else).

This is the reference the Ascend kernel set (graphs/kernels/ascend.py) must agree with;
tests/test_fused_semantics.py checks each piece here against a numpy model of the
corresponding fused Ascend operator's documented semantics.

Tensor layouts at the kernel boundary (shared with the Ascend set):
- q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim] (BSND), after
  projection; decode has seq = 1.
- cos/sin [batch or 1, seq, 1, head_dim] (rotary over the last axis, broadcast over heads).
- attention output [tokens, heads * head_dim], ready for o_proj.

Grouped-query attention without repeating K/V: the `groups` query heads of one KV head
are folded into the row axis ([b, kv_heads, groups*s, hd]) so one batched matmul serves
the group; HF's repeat_kv maps query head h to KV head h // groups, and folding
contiguous heads preserves exactly that mapping.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import rank_sizes
from dsflow.graphs.layers import iota_like

# Added to attention scores that must not be attended. Finite, so a row can never
# become NaN, and far below any real score so exp() underflows to exactly 0.
MASK_VALUE = -1e30


def attention_scale(head_dim: int) -> float:
    """Softmax scale of every attention kernel (HF: 1 / sqrt(head_dim))."""
    return 1.0 / math.sqrt(head_dim)


class RmsNormKernel(nn.Cell):
    """Llama RMSNorm, computed in fp32 whatever the weight dtype (as HF does):
    y = cast(x * rsqrt(mean(x^2) + eps)) * weight."""

    def __init__(self, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.dtype = dtype

    def construct(self, x, weight):
        x32 = ops.cast(x, ms.float32)
        var = ops.mean(ops.square(x32), -1, keep_dims=True)
        return ops.cast(x32 * ops.rsqrt(var + self.eps), self.dtype) * weight


def inv_freq(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """Rotary inverse frequencies as HF computes them (fp32, theta ** (2i/d)), divided by
    the linear position-interpolation factor, so cos/sin match transformers to the last
    bit or two."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32) / np.float32(factor)


class Rotary(nn.Cell):
    """Rotary embedding, HF half-split (rotate_half) convention, linear interpolation."""

    def __init__(self, head_dim: int, theta: float, factor: float, dtype):
        super().__init__()
        self.inv_freq = Tensor(inv_freq(head_dim, theta, factor).reshape(1, 1, -1), ms.float32)
        self.half = head_dim // 2
        self.dtype = dtype

    def cos_sin(self, positions):
        """positions int32 [B', S] -> cos, sin [B', S, 1, head_dim] in the model dtype
        (B' = 1 in prefill: every sequence starts at 0, so batch is broadcast)."""
        freqs = ops.expand_dims(ops.cast(positions, ms.float32), -1) * self.inv_freq
        emb = ops.expand_dims(ops.concat((freqs, freqs), -1), 2)
        return ops.cos(emb).astype(self.dtype), ops.sin(emb).astype(self.dtype)

    def apply(self, x, cos, sin):
        """x [b, s, heads, hd] -> x * cos + rotate_half(x) * sin."""
        x1 = x[:, :, :, :self.half]
        x2 = x[:, :, :, self.half:]
        return x * cos + ops.concat((-x2, x1), -1) * sin


class Attention(nn.Cell):
    """Attention and KV-cache handling of one rank, shared by all layers (no parameters).

    Prefill: `prefill_mask` once per graph, `prefill` per layer. Decode: `decode_begin`
    once, `layer_cache` + `decode` per layer, `decode_end` once. Decode here attends to
    the cached positions and the new token separately and writes every layer's new K/V
    with one scatter at the end (a per-layer write copied the cache twice more on CPU).
    """

    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        sizes = rank_sizes(cfg, tp)
        self.heads = sizes.heads
        self.kv_heads = sizes.kv_heads
        self.groups = cfg.num_groups
        self.head_dim = cfg.head_dim
        self.layers = cfg.num_layers
        self.scale = attention_scale(cfg.head_dim)
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.pv_matmul = ops.BatchMatMul()
        self.reduce_max = ops.ReduceMax(keep_dims=True)
        self.reduce_sum = ops.ReduceSum(keep_dims=True)

    # ---- prefill -------------------------------------------------------------------
    def prefill_mask(self, pos):
        """pos [s] (0..s-1) -> causal mask [1, 1, groups*s, s], True = attend. With right
        padding a real token never sees a pad, so no padding mask is needed."""
        seq = ops.shape(pos)[0]
        causal = ops.expand_dims(pos, 1) >= ops.expand_dims(pos, 0)
        causal = ops.tile(ops.expand_dims(causal, 0), (self.groups, 1, 1))
        return ops.reshape(causal, (1, 1, -1, seq))

    def prefill(self, q, k, v, mask):
        """q [b, s, heads, hd], k/v [b, s, kv_heads, hd] -> (out [b*s, heads*hd],
        k, v [b, kv_heads, s, hd] for the cache)."""
        batch, seq = ops.shape(q)[0], ops.shape(q)[1]
        q = ops.transpose(q, (0, 2, 1, 3))
        k = ops.transpose(k, (0, 2, 1, 3))
        v = ops.transpose(v, (0, 2, 1, 3))
        q = ops.reshape(q, (batch, self.kv_heads, self.groups * seq, self.head_dim))
        out = self._attend(q, k, v, mask)
        out = ops.reshape(out, (batch, self.heads, seq, self.head_dim))
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, self.heads * self.head_dim))
        return out, k, v

    def _attend(self, q, k, v, mask):
        """q [b, kv_heads, rows, hd], k/v [b, kv_heads, t, hd], mask True = attend."""
        scores = self.qk_matmul(q, k) * self.scale
        scores = ops.select(mask, scores, ops.full_like(scores, MASK_VALUE))
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        return self.pv_matmul(probs, v)

    # ---- decode --------------------------------------------------------------------
    def decode_begin(self, key_cache, value_cache, positions):
        """Per-step context: the per-layer caches and which slots are already written.

        One Unstack per cache, never `cache[i]`: on CPU a dynamic-shape StridedSlice of
        the cache per layer cost 2.5 ms each (30x an Unstack of all layers)."""
        key_layers = ops.unstack(key_cache, 0)
        value_layers = ops.unstack(value_cache, 0)
        slots = iota_like(key_layers[0][0, 0, :, 0])  # [kv_len] int32
        visible = ops.expand_dims(slots, 0) < ops.expand_dims(positions, 1)  # [b, kv_len]
        visible = ops.expand_dims(ops.expand_dims(visible, 1), 1)  # [b, 1, 1, kv_len]
        return key_layers, value_layers, visible, positions

    def layer_cache(self, ctx, i: int):
        return ctx[0][i], ctx[1][i]

    def decode(self, q, k, v, k_cache, v_cache, ctx):
        """q [b, 1, heads, hd], k/v [b, 1, kv_heads, hd]; caches [b, kv_heads, kv_len, hd]
        hold the positions before this token. Returns out [b, heads*hd] and the new K/V
        [b, kv_heads, 1, hd] (written by `decode_end`, not here)."""
        visible = ctx[2]
        q = ops.reshape(q, (-1, self.kv_heads, self.groups, self.head_dim))
        k_new = ops.reshape(k, (-1, self.kv_heads, 1, self.head_dim))
        v_new = ops.reshape(v, (-1, self.kv_heads, 1, self.head_dim))
        old = self.qk_matmul(q, k_cache) * self.scale  # [b, kv_heads, groups, kv_len]
        old = ops.select(visible, old, ops.full_like(old, MASK_VALUE))
        new = self.reduce_sum(q * k_new, -1) * self.scale  # [.., groups, 1]
        # softmax over [old, new] without concatenating (no dynamic slicing afterwards)
        top = ops.maximum(self.reduce_max(old, -1), new)
        e_old = ops.exp(old - top)
        e_new = ops.exp(new - top)
        denom = self.reduce_sum(e_old, -1) + e_new
        out = (self.pv_matmul(e_old, v_cache) + e_new * v_new) / denom
        return ops.reshape(out, (-1, self.heads * self.head_dim)), k_new, v_new

    def decode_end(self, key_cache, value_cache, ctx, keys, values):
        """Write every layer's new K/V at slot positions[b] with one scatter per cache."""
        index = self._write_index(ctx[3])
        key_cache = ops.tensor_scatter_update(key_cache, index, self._updates(keys))
        value_cache = ops.tensor_scatter_update(value_cache, index, self._updates(values))
        return key_cache, value_cache

    def _write_index(self, positions):
        """[(layer, b, head, positions[b]) for every layer, b, head] -> [L*b*heads, 4]."""
        b = ops.reshape(iota_like(positions), (1, -1, 1))
        pos = ops.reshape(positions, (1, -1, 1))
        layer = ops.reshape(iota_like(ops.ones((self.layers,), ms.int32)), (-1, 1, 1))
        head = ops.reshape(iota_like(ops.ones((self.kv_heads,), ms.int32)), (1, 1, -1))
        zero = ops.zeros_like(layer + b + head)
        index = ops.stack((layer + zero, b + zero, head + zero, pos + zero), -1)
        return ops.reshape(index, (-1, 4))

    def _updates(self, per_layer):
        """Tuple of [b, kv_heads, 1, hd] per layer -> [L*b*kv_heads, hd] in index order."""
        stacked = ops.stack(per_layer, 0)
        return ops.reshape(stacked, (-1, self.head_dim))
