"""Ascend kernel set: MindSpore's fused Ascend operators, same interface as the portable set.

None of these operators has a CPU kernel in MindSpore 2.10: graphs built from them are
exported here (MindSpore infers their shapes on CPU) and run only on Ascend. Their
numerics are pinned by tests/test_fused_semantics.py, which checks the portable set
against numpy models of each operator's documented semantics; docs/ASCEND_GRAPHS.md
has the mapping table and the reasons for each choice.

- RmsNorm(eps)(x, gamma) -> (y, rstd); y only.
- RotaryPositionEmbedding(x, cos, sin, mode=0): mode 0 is rotate_half (HF Llama). x is
  BSND [b, s, n, d] with cos/sin BS1D (each row's chunk starts at its own position). BSND, not BNSD: the
  op refuses BNSD when B*N > 8*S with a 32-byte-aligned D, i.e. every decode step.
- Prefill (a chunk of s tokens per row after start[b] cached ones): PromptFlashAttention,
  BNSD, native GQA (num_key_value_heads), over the concatenation [cache window | chunk]
  with a bool mask [b, 1, s, kv_len + s] built in-graph, True = masked (window
  positions >= start[b], later chunk tokens); sparse_mode 0, no band (next_tokens
  unbounded: a band aligned at key 0 would hide the window).
- Attention runs in float16 (graphs/kernels/__init__.py ASCEND_CACHE_DTYPE: the caches at the
  graph boundary are fp16 because Lite has no bf16 tensors); q/k/v are cast on the way
  in and the output back to the model dtype.
- Decode: the new K/V are written into this step's copy of the layer's cache window at
  positions[b] (axis -2 of BNSD; the runtime passes kv_len > positions) by Select
  (where slot == positions[b], the new row broadcast by an Add of zeros; else the
  window), then IncreFlashAttention attends over it with a padding mask
  [b, 1, 1, kv_len] (True = slot > positions[b]) and actual_seq_lengths = positions + 1
  (lets the kernel stop early). Not KVCacheScatterUpdate: MindSpore has only a
  pyboost/aclnn kernel for it and no GE operator adapter, and MindSpore Lite's GE path
  converts every node through an adapter (docs/ASCEND.md section 8); Select, Equal,
  Add, ZerosLike and Cast all have adapters. Select's operands are given the same
  shape (GE's Select, unlike SelectV2, does not broadcast); the full-shape condition
  and zeros are built once per graph from layer 0's window (every layer's window has
  that shape). A padding row (position -1) matches no slot: nothing is written.
- inner_precise 0 for both fused attentions: high-precision mode for float16 inputs
  (1 is high-performance mode; MindSpore's prompt_flash_attention_doc.yaml /
  incre_flash_attention_doc.yaml). In window mode only the new K/V leave the graph and
  the worker writes them into its slots; in resident mode (the Ascend default) the
  "window" is the batch's slots gathered from the whole device-resident cache and the
  new K/V are scattered into it by plain ops shared with the portable set
  (graphs/model.py SlotWriter; graphs/signatures.py).
"""
from __future__ import annotations

from mindspore import nn, ops
import mindspore as ms
from mindspore.ops.auto_generate import (IncreFlashAttention, PromptFlashAttention, RmsNorm,
                                         RotaryPositionEmbedding)

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import rank_sizes
from dsflow.graphs.kernels.portable import Rotary as PortableRotary
from dsflow.graphs.kernels.portable import attention_scale
from dsflow.graphs.layers import iota_like

ROPE_MODE_ROTATE_HALF = 0
MAX_TOKENS = 2147483647  # "no limit" for pre_tokens
# PFA / IFA inner_precise: 0 = high precision for float16 inputs, 1 = high performance
# (MindSpore's prompt_flash_attention_doc.yaml); the attention runs in float16 here.
HIGH_PRECISION = 0


class RmsNormKernel(nn.Cell):
    """Fused RmsNorm: y = x / sqrt(mean(x^2) + eps) * gamma (fp32 inside the kernel)."""

    def __init__(self, eps: float, dtype):
        super().__init__()
        self.op = RmsNorm(eps)

    def construct(self, x, weight):
        return self.op(x, weight)[0]


class Rotary(PortableRotary):
    """Same cos/sin as the portable set (one definition of the frequencies); the
    rotation itself is the fused RotaryPositionEmbedding in rotate_half mode."""

    def __init__(self, head_dim: int, theta: float, factor: float, dtype):
        super().__init__(head_dim, theta, factor, dtype)
        self.rope = RotaryPositionEmbedding()

    def apply(self, x, cos, sin):
        return self.rope(x, cos, sin, ROPE_MODE_ROTATE_HALF)


class Attention(nn.Cell):
    """PromptFlashAttention for prefill; a Select write of the new K/V, then
    IncreFlashAttention, per layer for decode (write first, then attend over the
    updated cache)."""

    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        sizes = rank_sizes(cfg, tp)
        self.heads = sizes.heads
        self.kv_heads = sizes.kv_heads
        self.head_dim = cfg.head_dim
        scale = attention_scale(cfg.head_dim)
        self.pfa = PromptFlashAttention(
            num_heads=self.heads, scale_value=scale, pre_tokens=MAX_TOKENS,
            next_tokens=MAX_TOKENS,  # no band: the mask says it all (window + chunk)
            input_layout="BNSD", num_key_value_heads=self.kv_heads, sparse_mode=0,
            inner_precise=HIGH_PRECISION)
        self.ifa = IncreFlashAttention(
            num_heads=self.heads, input_layout="BNSD", scale_value=scale,
            num_key_value_heads=self.kv_heads, inner_precise=HIGH_PRECISION)

    def _bnsd(self, x):
        return ops.transpose(x, (0, 2, 1, 3))

    @staticmethod
    def _half(x):
        return ops.cast(x, ms.float16)

    # ---- both graphs ---------------------------------------------------------------
    def window_context(self, key_window, value_window, lengths):
        """The windows; for prefill the window mask [b, 1, 1, kv_len] (True = masked:
        position >= start[b]) and an all-False [b, 1, 1, 1] to broadcast the chunk mask
        over the batch; for decode write offsets, valid lengths (positions + 1), the
        mask of positions > positions[b] (the new token is written at positions[b]),
        and for the write the full-shape [b, kv_heads, kv_len, hd] condition
        slot == positions[b] and fp16 zeros (see `write_token`). Unused outputs are
        dropped by the compiler (prefill never reads the last two)."""
        slots = iota_like(key_window[0, 0, 0, :, 0])  # [kv_len] int32, not the fp16 cache dtype
        masked = ops.expand_dims(slots, 0) >= ops.expand_dims(lengths, 1)  # [b, kv_len]
        masked = ops.expand_dims(ops.expand_dims(masked, 1), 1)
        offsets = ops.cast(lengths, ms.int64)
        no_rows = ops.reshape(ops.zeros_like(lengths) > 0, (-1, 1, 1, 1))
        after = ops.expand_dims(slots, 0) > ops.expand_dims(lengths, 1)  # decode: > position
        after = ops.expand_dims(ops.expand_dims(after, 1), 1)
        zero = ops.zeros_like(key_window[0])  # [b, kv_heads, kv_len, hd], the cache dtype
        at = ops.reshape(slots, (1, 1, -1, 1)) + ops.cast(zero, ms.int32)
        hit = ops.equal(at, ops.reshape(lengths, (-1, 1, 1, 1)))  # slot == positions[b]
        return (key_window, value_window, masked, offsets, offsets + 1, no_rows, after,
                hit, zero)

    def layer_cache(self, ctx, i: int):
        return ctx[0][i], ctx[1][i]

    def window_end(self, keys, values):
        return ops.stack(keys, 0), ops.stack(values, 0)

    # ---- prefill -------------------------------------------------------------------
    def prefill_mask(self, pos):
        """pos [s] -> bool [1, 1, s, s], True where key j > query i (masked)."""
        seq = ops.shape(pos)[0]
        masked = ops.expand_dims(pos, 0) > ops.expand_dims(pos, 1)
        return ops.reshape(masked, (1, 1, seq, seq))

    def prefill_full_mask(self, ctx, mask):
        """[b, 1, s, kv_len + s], True = masked: window positions >= start[b], and the
        chunk's causal mask."""
        # mask[..., :1] is all False (key 0 is never after a query): [1, 1, s, 1]
        past = ops.logical_or(ctx[2], mask[:, :, :, :1])  # [b, 1, s, kv_len]
        chunk = ops.logical_or(mask, ctx[5])  # [b, 1, s, s]
        return ops.concat((past, chunk), -1)

    def prefill(self, q, k, v, k_past, v_past, ctx, mask):
        """Same contract as the portable `prefill`: PromptFlashAttention over [window |
        chunk] with mask [b, 1, s, kv_len + s] (window positions >= start[b] and later
        chunk tokens masked)."""
        k = self._half(self._bnsd(k))
        v = self._half(self._bnsd(v))
        keys = ops.concat((k_past, k), 2)
        values = ops.concat((v_past, v), 2)
        out = self.pfa(self._half(self._bnsd(q)), keys, values,
                       attn_mask=self.prefill_full_mask(ctx, mask))  # [b, heads, s, hd]
        out = ops.reshape(self._bnsd(out), (-1, self.heads * self.head_dim))
        return ops.cast(out, q.dtype), k, v

    # ---- decode --------------------------------------------------------------------
    @staticmethod
    def write_token(past, new, ctx):
        """past [b, kv_heads, kv_len, hd] with new [b, kv_heads, 1, hd] written at
        positions[b]: Select over operands of one shape (ctx[7] the condition, new
        broadcast by adding ctx[8]'s zeros); rows whose position matches no slot
        (padding, -1) come back unchanged."""
        return ops.select(ctx[7], new + ctx[8], past)

    def decode(self, q, k, v, k_past, v_past, ctx):
        """Same contract as the portable `decode`. The new K/V are written into this
        step's window copy at positions[b] (the runtime passes kv_len > positions), so
        IncreFlashAttention attends a prefix: actual_seq_lengths = positions + 1."""
        masked, lengths = ctx[6], ctx[4]
        # s = 1, so BSND [b, 1, n, d] -> BNSD [b, n, 1, d] is a reshape, not a transpose
        dtype = q.dtype
        q = self._half(ops.reshape(q, (-1, self.heads, 1, self.head_dim)))
        k = self._half(ops.reshape(k, (-1, self.kv_heads, 1, self.head_dim)))
        v = self._half(ops.reshape(v, (-1, self.kv_heads, 1, self.head_dim)))
        k_past = self.write_token(k_past, k, ctx)
        v_past = self.write_token(v_past, v, ctx)
        # by keyword: IncreFlashAttention's optional inputs changed order across releases
        # (older GE adapters: 5 padding_mask, 6 actual_seq_lengths; docs/ASCEND.md §8)
        out = self.ifa(q, [k_past], [v_past], attn_mask=masked,
                       actual_seq_lengths=lengths)  # [b, heads, 1, hd]
        out = ops.reshape(out, (-1, self.heads * self.head_dim))
        return ops.cast(out, dtype), k, v
