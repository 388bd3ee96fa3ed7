"""Weight-only block quantisation in ONNX Runtime's MatMulNBits layout.

MatMulNBits (com.microsoft, ONNX Runtime contrib op docs) computes A @ dequant(B).T
for B stored as the [N, K] (HF [out, in]) matrix cut into blocks of `block_size`
consecutive input features: `B` uint8 [N, blocks, block_size * bits / 8] (two 4-bit
values per byte, the even element in the low nibble), `scales` float [N, blocks],
and without a `zero_points` input a zero point of 2^(bits-1). So
w = (q - 2^(bits-1)) * scale.

Kept here, in numpy, rather than taken from onnxruntime.quantization: that tool
rewrites a finished fp32 model (which would have to exist in memory first, with
every weight twice), while the exporter emits the quantised nodes directly; the
format is small and tests/test_onnx.py checks it against ONNX Runtime's own kernel.
Symmetric (absmax) scales: the round trip error of a weight is at most scale / 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedWeight:
    blocks: np.ndarray   # uint8 [n, k_blocks, block_size * bits / 8]
    scales: np.ndarray   # float32 [n, k_blocks]
    n: int
    k: int
    bits: int
    block_size: int


def quantize(weight: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    """An HF [out, in] fp32 weight -> MatMulNBits blocks (in features zero-padded to a
    whole number of blocks)."""
    if bits not in (4, 8):
        raise ValueError(f"bits {bits}: MatMulNBits here supports 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size}: a power of two >= 16")
    w = np.asarray(weight, np.float32)
    n, k = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, blocks * block_size - k)))
    w = w.reshape(n, blocks, block_size)
    top = (1 << (bits - 1)) - 1
    scales = np.abs(w).max(axis=2) / top
    safe = np.where(scales == 0, 1.0, scales)
    q = np.clip(np.rint(w / safe[:, :, None]), -top - 1, top).astype(np.int16) + (top + 1)
    q = q.astype(np.uint8)
    if bits == 4:
        q = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    return QuantizedWeight(np.ascontiguousarray(q), scales.astype(np.float32), n, k, bits,
                           block_size)


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """The [n, k] fp32 weight MatMulNBits multiplies by (for tests and error budgets)."""
    raw = q.blocks
    if q.bits == 4:
        raw = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(q.n, raw.shape[1], -1)
    w = (raw.astype(np.float32) - (1 << (q.bits - 1))) * q.scales[:, :, None]
    return w.reshape(q.n, -1)[:, :q.k]
