"""Kernel sets: which operators the one model definition (graphs/model.py) is built from.

`RankModel(cfg, tp, dtype, target=...)` asks `kernel_set(target)` for three
parameter-free cell classes with one interface (see graphs/kernels/portable.py):
  - `RmsNormKernel(eps, dtype)(x, weight)`
  - `Rotary(head_dim, theta, factor, dtype)`: `cos_sin(positions)`, `apply(x, cos, sin)`
  - `Attention(cfg, tp)`: prefill_mask/prefill, decode_begin/layer_cache/decode/decode_end
Weights live outside the kernels (graphs/layers.py), so parameter names and shapes and
the graph signatures are the same for every target; only the operators differ.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsflow.common.errors import DsflowError

# Default weight/cache dtype per target: CPU runs fp32 only (bf16 has no CPU matmul);
# Ascend runs bf16, the dtype DeepSeek-Coder was trained in (fp16 overflows).
TARGET_DTYPES = {"cpu": "float32", "ascend": "bfloat16"}
TARGETS = tuple(TARGET_DTYPES)
# Default KV-cache mode per target (graphs/signatures.py): on CPU the host-held cache
# and per-step windows cost only what the sequences hold; on Ascend the cache stays on
# the card (a window would cross PCIe every step) where the Lite release takes device
# tensors; the build picks window on older ones (artifacts/lite.py ascend_cache_mode).
TARGET_CACHE_MODES = {"cpu": "window", "ascend": "resident"}
# The fused attention operators accept only 16-bit inputs (fp32 fails shape inference).
ASCEND_DTYPES = ("bfloat16", "float16")
# KV-cache dtype at the graph boundary on Ascend: float16 whatever the weights. The
# caches are graph inputs/outputs that the Lite runtime must allocate on the device,
# and mindspore_lite's Python API has no bfloat16 DataType (FLOAT16/FLOAT32 only, as
# of its 2.x docs). Attention therefore runs in fp16 inside the bf16 model: its inputs
# are post-RMSNorm projections (far from fp16's range limit, unlike the residual stream
# that makes fp16 DeepSeek-Coder overflow) and the fused kernels accumulate in fp32.
ASCEND_CACHE_DTYPE = "float16"


class TargetError(DsflowError):
    """A target or target/dtype combination the graphs cannot be built for."""


@dataclass(frozen=True)
class KernelSet:
    target: str
    rms_norm: type
    rotary: type
    attention: type


def check_target(target: str, dtype: str) -> None:
    if target not in TARGET_DTYPES:
        raise TargetError(f"target {target!r}: unknown (choose from {', '.join(TARGETS)})")
    if target == "cpu" and dtype == "bfloat16":
        raise TargetError("dtype 'bfloat16' with target 'cpu': MindSpore 2.10 has no CPU "
                          "kernels for bf16 matmul/gather; use float32 (or --target ascend)")
    if target == "ascend" and dtype not in ASCEND_DTYPES:
        raise TargetError(f"dtype {dtype!r} with target 'ascend': the fused attention "
                          f"operators need {' or '.join(ASCEND_DTYPES)}")


def cache_dtype(target: str, dtype: str) -> str:
    """The KV-cache dtype of the graphs built for `target` with weights in `dtype`."""
    return ASCEND_CACHE_DTYPE if target == "ascend" else dtype


def kernel_set(target: str, dtype: str) -> KernelSet:
    """The kernel classes for `target` (imported lazily: both need MindSpore)."""
    check_target(target, dtype)
    if target == "ascend":
        from dsflow.graphs.kernels import ascend as k
    else:
        from dsflow.graphs.kernels import portable as k
    return KernelSet(target, k.RmsNormKernel, k.Rotary, k.Attention)
