"""Numbers every target's graphs share: the rotary tables and the softmax scale.

DeepSeek-Coder uses HF's half-split (rotate_half) rotary embedding with linear
position interpolation (rope_scaling {"type": "linear", "factor": 4}): positions are
divided by the factor, which is the same as dividing the inverse frequencies by it.
The MindSpore kernels (graphs/kernels/portable.py, ascend.py) compute cos/sin in-graph
from `inv_freq`; the ONNX graphs (graphs/onnx_model.py) take the precomputed
`cos_sin_tables` as GroupQueryAttention's cos/sin caches. Both read the inverse
frequencies from here, so the scaling cannot be applied in one target and dropped in
the other (onnxruntime-genai's builder drops it: its logits differ from
transformers' from position 1).

numpy only: no MindSpore, so the ONNX exporter and the runtime can import it.
"""
from __future__ import annotations

import math

import numpy as np

from dsflow.graphs.config import ModelConfig


def inv_freq(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """Rotary inverse frequencies bit for bit as transformers computes them (fp32
    exponent 2i/d; the power of the float theta rounded once to fp32, as torch's
    scalar ** tensor gives; then 1/x and the linear position-interpolation factor in
    fp32), so cos/sin equal LlamaRotaryEmbedding's at every position. numpy's fp32
    power is 1-2 ulp off torch's, which at position 16383 moved cos/sin by 1e-4
    (tests/test_long_context.py)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power) / np.float32(factor)


def cos_sin_tables(cfg: ModelConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim / 2] fp32 for positions 0..positions-1.

    The angle is the fp32 product position * inv_freq, as transformers forms it (an fp32
    matmul with inner dimension 1); cos/sin of that fp32 angle are then taken in fp64 and
    rounded once, so each entry is within half an ulp of the exact value."""
    freq = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)
    angle = np.arange(positions, dtype=np.float32)[:, None] * freq[None, :]
    angle = angle.astype(np.float64)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def attention_scale(head_dim: int) -> float:
    """Softmax scale of every attention kernel (HF: 1 / sqrt(head_dim))."""
    return 1.0 / math.sqrt(head_dim)
