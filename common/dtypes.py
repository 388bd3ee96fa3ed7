"""dtype conversion without torch: bfloat16 travels as uint16 bit patterns.

bf16 is the top half of an fp32, so widening is a shift; narrowing rounds to nearest
even, as torch and MindSpore do.
"""
from __future__ import annotations

import numpy as np

from dsflow.common.errors import ExportError

STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
FLOAT_DTYPES = tuple(STORAGE)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (0x7FFF + ((u >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def convert(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert between float dtypes given by name (bf16 as uint16 storage)."""
    if src == dst:
        return arr
    if src not in STORAGE or dst not in STORAGE:
        raise ExportError(f"cannot convert {src} to {dst}")
    f32 = bf16_to_f32(arr) if src == "bfloat16" else arr.astype(np.float32)
    if dst == "bfloat16":
        return f32_to_bf16(f32)
    return f32.astype(STORAGE[dst])
