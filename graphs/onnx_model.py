"""DeepSeek-Coder (Llama architecture) for one rank, emitted as an ONNX graph.

The second emitter of the one model definition. What it shares with the MindSpore
model (graphs/model.py) is everything that defines the model rather than the
operators that compute it:
- the configuration (graphs/config.py `ModelConfig`) and the per-rank sizes
  (graphs/tp_plan.py `rank_sizes`);
- the weights: every initializer comes from one `WeightSpec` of
  `tp_plan.weight_specs`, under its checkpoint name, and `check_weights` refuses
  weights that miss, add to or disagree with the plan, as `RankModel` does for its
  parameters;
- the layer sequence with the same HF names as the cell tree of graphs/model.py
  (embed -> per layer: input norm, q/k/v, rotary, attention, o_proj, residual,
  post-attention norm, SwiGLU MLP, residual -> final norm -> lm_head on each row's
  last real token), written out in `build_rank_graph`;
- the numbers: rotary inverse frequencies with the linear scaling applied and the
  softmax scale (graphs/numerics.py), and rms_norm_eps;
- the graph signature (graphs/signatures.py, "inplace" cache mode).
Only the kernels differ, as between the portable and Ascend kernel sets: here they
are ONNX Runtime's fused CPU operators (SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, GroupQueryAttention with rotary, MatMulNBits).
A MindSpore Cell tree cannot be traced into ONNX without MindSpore's own ONNX export
(which has no GroupQueryAttention and no in-place cache), so the ONNX nodes are
written here with `onnx.helper`, one small function per piece.

Layout notes. fp32 MatMul weights are stored transposed ([in, out], what ONNX MatMul
takes) under their HF names, except q/k/v, concatenated into one `qkv_proj` (below); quantised ones are MatMulNBits blocks of the HF
[out, in] matrix (graphs/onnx_quant.py) as `<name>.q` and `<name>.scales`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import numpy as np

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.numerics import attention_scale, cos_sin_tables
from dsflow.graphs.onnx_quant import QuantizedWeight, quantize
from dsflow.graphs.signatures import INPLACE, GraphSignature, graph_signature
from dsflow.graphs.tp_plan import PlanMismatchError, RankSizes, rank_sizes, weight_specs

ONNX_TARGET = "onnx"
MS_DOMAIN = "com.microsoft"
OPSET = 23  # RMSNormalization (opset 23) for the first norm
QUANT_MODES = ("none", "int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}
# Per block of this many input features one scale (MatMulNBits block_size). 128 (the
# group size of GPTQ/AWQ checkpoints): a decode step at batch 1 is 20-30% faster than at
# 32 (ORT 1.32, 2 threads), for +0.0001 (int8) / +0.0016 (int4) of fp32's bits/byte on
# the default model (docs/BENCHMARKS.md, tools/eval_onnx_quant.py; budgets 1.01x/1.05x).
DEFAULT_BLOCK_SIZE = 128

# q, k and v stored as one matrix (rows q | k | v) and multiplied once; GroupQueryAttention
# takes the packed result. One MatMul instead of three per layer, as onnxruntime-genai
# does; the per-rank q/k/v shapes still come from, and are checked against, the plan.
QKV_SUFFIX = "self_attn.qkv_proj.weight"
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def weight_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


@dataclass(frozen=True)
class QuantPolicy:
    """Which matrices are quantised, and how.

    `bits` 0 = fp32 everywhere. The embedding stays fp32 (a decode step gathers one row
    per token: it costs memory, not time). `lm_head_bits` may differ from `bits`: the
    largest matrix of a step, and the one whose error reaches the logits directly
    (docs/BENCHMARKS.md has the measurement behind the default)."""

    bits: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    lm_head_bits: int = 0
    # MatMulNBits accuracy_level 4: activations quantised to int8 per block and integer
    # dot products. Without it the 8-bit kernel dequantises on every call (measured
    # 23 ms vs 0.05 ms for one 768x2048 matrix at batch 1, docs/BENCHMARKS.md); the
    # quality cost is measured in bits/byte (within the budget).
    accuracy_level: int = 4

    @classmethod
    def from_mode(cls, mode: str, block_size: int = DEFAULT_BLOCK_SIZE,
                  lm_head: Optional[str] = None, accuracy_level: int = 4) -> "QuantPolicy":
        bits = QUANT_BITS.get(mode, 0)
        head = bits if lm_head is None else QUANT_BITS.get(lm_head, 0)
        return cls(bits, block_size, head, accuracy_level)

    def bits_for(self, name: str) -> int:
        return self.lm_head_bits if name == LM_HEAD else self.bits

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size,
                "lm_head_bits": self.lm_head_bits, "embedding_bits": 0,
                "accuracy_level": self.accuracy_level}


def check_weights(cfg: ModelConfig, tp: int, weights: Mapping[str, np.ndarray]) -> None:
    """The weights are exactly the TP plan's tensors in their per-rank shapes."""
    left = set(weights)
    for spec in weight_specs(cfg):
        if spec.name not in weights:
            raise PlanMismatchError(f"tensor {spec.name}: in the TP plan but not in the "
                                    "rank weights")
        shape = tuple(weights[spec.name].shape)
        if shape != spec.rank_shape(tp):
            raise PlanMismatchError(f"tensor {spec.name}: rank shape {list(shape)} != TP "
                                    f"plan shape {list(spec.rank_shape(tp))}")
        left.discard(spec.name)
    if left:
        raise PlanMismatchError(f"tensor {sorted(left)[0]}: not in the TP plan")


class _Builder:
    """Nodes and initializers of one graph under construction."""

    def __init__(self, policy: QuantPolicy):
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.policy = policy
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def node(self, op: str, inputs: list[str], outputs: Optional[list[str]] = None,
             domain: str = "", **attrs) -> list[str]:
        outputs = outputs or [self.name(op.lower())]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=self.name(op),
                                                domain=domain, **attrs))
        return outputs

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def linear(self, x: str, name: str, weight: np.ndarray) -> str:
        """x @ weight.T for an HF [out, in] weight: fp32 MatMul or MatMulNBits."""
        bits = self.policy.bits_for(name)
        if not bits:
            return self.node("MatMul", [x, self.const(name, weight.T.astype(np.float32))])[0]
        q: QuantizedWeight = quantize(weight, bits, self.policy.block_size)
        return self.node("MatMulNBits", [x, self.const(name + ".q", q.blocks),
                                         self.const(name + ".scales", q.scales)],
                         domain=MS_DOMAIN, K=q.k, N=q.n, bits=bits,
                         block_size=q.block_size,
                         accuracy_level=self.policy.accuracy_level)[0]


def _int32_scalar_ops(b: _Builder) -> tuple[str, str, str]:
    """seq (int32 [1]), seqlens_k = start + seq - 1 [batch], total_sequence_length
    (int32 scalar) = max(start) + seq, in int32 like every position."""
    shape = b.node("Shape", ["input_ids"], start=1, end=2)[0]
    seq = b.node("Cast", [shape], to=6)[0]  # int32 [1]
    one = b.const("one_i32", np.array([1], np.int32))
    seqlens = b.node("Sub", [b.node("Add", ["start", seq])[0], one], ["seqlens_k"])[0]
    top = b.node("ReduceMax", ["start"], keepdims=1)[0]
    total = b.node("Squeeze", [b.node("Add", [top, seq])[0]],
                   ["total_sequence_length"])[0]
    return seq, seqlens, total


def _last_token_rows(b: _Builder, hidden: str, seq: str, width: int) -> str:
    """[batch, seq, hidden] -> [batch, hidden]: row b's token valid_length[b] - 1."""
    flat = b.node("Reshape", [hidden, b.const("flat_shape", np.array([-1, width], np.int64))])[0]
    rows = b.node("Shape", ["start"])[0]
    zero = b.const("zero_i32", np.array(0, np.int32))
    one = b.const("one_i32_scalar", np.array(1, np.int32))
    count = b.node("Squeeze", [b.node("Cast", [rows], to=6)[0]])[0]
    first = b.node("Mul", [b.node("Range", [zero, count, one])[0], seq])[0]
    last = b.node("Sub", ["valid_length", b.const("one_i32_vec", np.array([1], np.int32))])[0]
    return b.node("Gather", [flat, b.node("Add", [first, last])[0]], axis=0)[0]


def _attention(b: _Builder, cfg: ModelConfig, sizes: RankSizes, layer: int, h: str,
               w: Mapping[str, np.ndarray], names: tuple[str, str, str, str],
               seqlens: str, total: str) -> str:
    past_k, past_v, present_k, present_v = names
    qkv = np.concatenate([w[weight_name(layer, f"self_attn.{p}_proj.weight")]
                          for p in ("q", "k", "v")])
    packed = b.linear(h, weight_name(layer, QKV_SUFFIX), qkv)
    out = b.node("GroupQueryAttention",
                 [packed, "", "", past_k, past_v, seqlens, total, "cos_cache", "sin_cache"],
                 [b.name("attn"), present_k, present_v], domain=MS_DOMAIN,
                 num_heads=sizes.heads, kv_num_heads=sizes.kv_heads, do_rotary=1,
                 rotary_interleaved=0, scale=attention_scale(cfg.head_dim))[0]
    name = weight_name(layer, "self_attn.o_proj.weight")
    return b.linear(out, name, w[name])


def _mlp(b: _Builder, layer: int, h: str, w: Mapping[str, np.ndarray]) -> str:
    gate_n, up_n, down_n = (weight_name(layer, f"mlp.{p}_proj.weight")
                            for p in ("gate", "up", "down"))
    gate = b.linear(h, gate_n, w[gate_n])
    up = b.linear(h, up_n, w[up_n])
    act = b.node("Mul", [b.node("Mul", [gate, b.node("Sigmoid", [gate])[0]])[0], up])[0]
    return b.linear(act, down_n, w[down_n])


def _skip_norm(b: _Builder, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(rms_norm(x + residual) * weight, x + residual)."""
    out = b.node("SkipSimplifiedLayerNormalization", [x, residual, weight],
                 [b.name("normed"), "", "", b.name("residual")], domain=MS_DOMAIN,
                 epsilon=eps)
    return out[0], out[3]


def build_rank_graph(cfg: ModelConfig, tp: int, weights: Mapping[str, np.ndarray],
                     capacity: int, policy: QuantPolicy = QuantPolicy()):
    """The ONNX ModelProto of one rank (`weights`: HF name -> this rank's fp32 array).

    `capacity` is the longest sequence the rotary tables cover (the manifest's
    max_seq_len); the graph's cache axis is dynamic up to it."""
    from onnx import helper
    if tp != 1:
        raise ValueError("the ONNX target is single-rank (ONNX Runtime has no CPU collective)")
    check_weights(cfg, tp, weights)
    sizes = rank_sizes(cfg, tp)
    sig: GraphSignature = graph_signature("prefill", cfg, tp, "float32", INPLACE)
    b = _Builder(policy)
    cos, sin = cos_sin_tables(cfg, capacity)
    b.const("cos_cache", cos)
    b.const("sin_cache", sin)
    seq, seqlens, total = _int32_scalar_ops(b)
    x = b.node("Gather", [b.const(EMBED, weights[EMBED].astype(np.float32)), "input_ids"],
               axis=0)[0]
    past_k = [t.name for t in sig.inputs if t.name.startswith("past_key.")]
    past_v = [t.name for t in sig.inputs if t.name.startswith("past_value.")]
    present_k = [t.name for t in sig.outputs if t.name.startswith("present_key.")]
    present_v = [t.name for t in sig.outputs if t.name.startswith("present_value.")]
    eps = cfg.rms_norm_eps
    residual = x
    h = b.node("RMSNormalization",
               [x, b.const(weight_name(0, "input_layernorm.weight"),
                           weights[weight_name(0, "input_layernorm.weight")])],
               axis=-1, epsilon=eps, stash_type=1)[0]
    for i in range(sizes.layers):
        attn = _attention(b, cfg, sizes, i, h, weights,
                          (past_k[i], past_v[i], present_k[i], present_v[i]), seqlens, total)
        post = weight_name(i, "post_attention_layernorm.weight")
        h, residual = _skip_norm(b, attn, residual, b.const(post, weights[post]), eps)
        mlp = _mlp(b, i, h, weights)
        nxt = weight_name(i + 1, "input_layernorm.weight") if i + 1 < sizes.layers else FINAL_NORM
        h, residual = _skip_norm(b, mlp, residual, b.const(nxt, weights[nxt]), eps)
    last = _last_token_rows(b, h, seq, sizes.hidden)
    b.linear(last, LM_HEAD, weights[LM_HEAD])
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(b.nodes, "dsflow_rank0", _value_infos(sig.inputs),
                              _value_infos(sig.outputs), initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="dsflow")
    model.ir_version = 10
    return model


_ONNX_TYPES = {"float32": 1, "int32": 6, "float16": 10}


def _value_infos(specs: Iterable) -> list:
    from onnx import helper
    return [helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype], list(t.shape))
            for t in specs]
