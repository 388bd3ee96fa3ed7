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

import mindspore as ms
from mindspore import Tensor, nn, ops

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import rank_sizes
from dsflow.graphs.layers import iota_like
from dsflow.graphs.numerics import attention_scale, inv_freq

# Added to attention scores that must not be attended. Finite, so a row can never
# become NaN, and far below any real score so exp() underflows to exactly 0.
MASK_VALUE = -1e30


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
    """Attention of one rank over a window of the slot cache plus the new tokens, shared
    by all layers (no parameters).

    Both graphs: `window_context` once (per-layer windows and which window positions
    each row may see), `layer_cache` per layer, `window_end` once (the new K/V of every
    layer, stacked, for the worker to write into its slots). Prefill additionally takes
    `prefill_mask` (causal within the chunk). The window and the new tokens are attended
    separately and combined in one softmax, so nothing is concatenated or scattered
    into the window (on CPU a per-step full-cache scatter cost as much as the attention).
    """

    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        sizes = rank_sizes(cfg, tp)
        self.heads = sizes.heads
        self.kv_heads = sizes.kv_heads
        self.groups = cfg.num_groups
        self.head_dim = cfg.head_dim
        self.scale = attention_scale(cfg.head_dim)
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.pv_matmul = ops.BatchMatMul()
        self.reduce_max = ops.ReduceMax(keep_dims=True)
        self.reduce_sum = ops.ReduceSum(keep_dims=True)

    # ---- both graphs ---------------------------------------------------------------
    def window_context(self, key_window, value_window, lengths):
        """Per-layer windows and visibility [b, 1, 1, kv_len] (position < lengths[b]).

        One Unstack per window, never `window[i]`: on CPU a dynamic-shape StridedSlice
        per layer cost 2.5 ms each (30x an Unstack of all layers)."""
        key_layers = ops.unstack(key_window, 0)
        value_layers = ops.unstack(value_window, 0)
        slots = iota_like(key_layers[0][0, 0, :, 0])  # [kv_len]
        visible = ops.expand_dims(slots, 0) < ops.expand_dims(lengths, 1)  # [b, kv_len]
        visible = ops.expand_dims(ops.expand_dims(visible, 1), 1)  # [b, 1, 1, kv_len]
        return key_layers, value_layers, visible

    def layer_cache(self, ctx, i: int):
        return ctx[0][i], ctx[1][i]

    def window_end(self, keys, values):
        """Tuples of per-layer [b, kv_heads, s, hd] -> [layers, b, kv_heads, s, hd]."""
        return ops.stack(keys, 0), ops.stack(values, 0)

    # ---- prefill: a chunk of s tokens per row ---------------------------------------
    def prefill_mask(self, pos):
        """pos [s] (0..s-1) -> causal mask [1, 1, groups*s, s], True = attend. With right
        padding a real token never sees a pad, so no padding mask is needed."""
        seq = ops.shape(pos)[0]
        causal = ops.expand_dims(pos, 1) >= ops.expand_dims(pos, 0)
        causal = ops.tile(ops.expand_dims(causal, 0), (self.groups, 1, 1))
        return ops.reshape(causal, (1, 1, -1, seq))

    def prefill(self, q, k, v, k_past, v_past, ctx, mask):
        """q [b, s, heads, hd], k/v [b, s, kv_heads, hd], windows [b, kv_heads, kv_len, hd]
        -> (out [b*s, heads*hd], k, v [b, kv_heads, s, hd] for the slots)."""
        batch, seq = ops.shape(q)[0], ops.shape(q)[1]
        q = ops.transpose(q, (0, 2, 1, 3))
        k = ops.transpose(k, (0, 2, 1, 3))
        v = ops.transpose(v, (0, 2, 1, 3))
        q = ops.reshape(q, (batch, self.kv_heads, self.groups * seq, self.head_dim))
        new = self.qk_matmul(q, k) * self.scale  # [b, kv_heads, groups*s, s]
        new = ops.select(mask, new, ops.full_like(new, MASK_VALUE))
        out = self._attend(q, k_past, v_past, ctx[2], new, v)
        out = ops.reshape(out, (batch, self.heads, seq, self.head_dim))
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, self.heads * self.head_dim))
        return out, k, v

    # ---- decode: one token per row ----------------------------------------------------
    def decode(self, q, k, v, k_past, v_past, ctx):
        """q [b, 1, heads, hd], k/v [b, 1, kv_heads, hd]; windows [b, kv_heads, kv_len, hd]
        hold the positions before this token. Returns out [b, heads*hd] and the new K/V
        [b, kv_heads, 1, hd]."""
        q = ops.reshape(q, (-1, self.kv_heads, self.groups, self.head_dim))
        k_new = ops.reshape(k, (-1, self.kv_heads, 1, self.head_dim))
        v_new = ops.reshape(v, (-1, self.kv_heads, 1, self.head_dim))
        new = self.reduce_sum(q * k_new, -1)  # [b, kv_heads, groups, 1]
        out = self._attend(q, k_past, v_past, ctx[2], new * self.scale, v_new)
        return ops.reshape(out, (-1, self.heads * self.head_dim)), k_new, v_new

    def _attend(self, q, k_past, v_past, visible, new, v_new):
        """softmax([q k_past^T (masked by `visible`), new]) @ [v_past; v_new], without
        concatenating: q [b, kv_heads, rows, hd], new [b, kv_heads, rows, t] (scaled,
        masked), v_new [b, kv_heads, t, hd]."""
        old = self.qk_matmul(q, k_past) * self.scale  # [b, kv_heads, rows, kv_len]
        old = ops.select(visible, old, ops.full_like(old, MASK_VALUE))
        top = ops.maximum(self.reduce_max(old, -1), self.reduce_max(new, -1))
        e_old = ops.exp(old - top)
        e_new = ops.exp(new - top)
        denom = self.reduce_sum(e_old, -1) + self.reduce_sum(e_new, -1)
        return (self.pv_matmul(e_old, v_past) + self.pv_matmul(e_new, v_new)) / denom
