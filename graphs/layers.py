"""Building blocks of the portable (CPU) graphs.

Performance note, measured on MindSpore 2.10 CPU: `ops.matmul` of a 3-D activation
by a 2-D weight broadcasts (copies) the whole weight on every call, which made decode
3.5x slower. Every projection here flattens tokens to 2-D and uses the `MatMul`
primitive with `transpose_b=True`, which reads the HF [out, in] weight in place.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero

# Added to attention scores that must not be attended. Finite, so a row can never
# become NaN, and far below any real score so exp() underflows to exactly 0.
MASK_VALUE = -1e30

# The communication group baked into exported graphs. Ascend's native world group;
# the CPU worker creates a group of this name over all ranks after init().
WORLD_GROUP = "hccl_world_group"


def weight(shape: tuple[int, ...], dtype) -> Parameter:
    """A parameter declared by shape only; data is loaded afterwards.

    Its name comes from where it sits in the cell tree, which mirrors the HF module
    tree, so the exported parameter names are the checkpoint's tensor names."""
    return Parameter(Tensor(shape=shape, dtype=dtype, init=Zero()), requires_grad=False)


class Linear(nn.Cell):
    """y = x @ W.T for x of shape [tokens, in] and an HF-layout weight [out, in]."""

    def __init__(self, out_features: int, in_features: int, dtype):
        super().__init__()
        self.weight = weight((out_features, in_features), dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        return self.matmul(x, self.weight)


class Embedding(nn.Cell):
    def __init__(self, rows: int, dim: int, dtype):
        super().__init__()
        self.weight = weight((rows, dim), dtype)

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    """Llama RMSNorm, computed in fp32 whatever the weight dtype (as HF does)."""

    def __init__(self, size: int, eps: float, dtype):
        super().__init__()
        self.weight = weight((size,), dtype)
        self.eps = eps
        self.dtype = dtype

    def construct(self, x):
        x32 = ops.cast(x, ms.float32)
        var = ops.mean(ops.square(x32), -1, keep_dims=True)
        y = ops.cast(x32 * ops.rsqrt(var + self.eps), self.dtype)
        return y * self.weight


class Rotary(nn.Cell):
    """Rotary embedding, HF half-split convention, with linear position interpolation.

    inv_freq is computed as HF does (fp32, theta ** (2i/d)) and divided by the linear
    factor, so cos/sin match transformers to the last bit or two.
    """

    def __init__(self, head_dim: int, theta: float, factor: float):
        super().__init__()
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32) / np.float32(factor)
        self.inv_freq = Tensor(inv_freq.reshape(1, -1), ms.float32)
        self.half = head_dim // 2

    def cos_sin(self, positions):
        """positions: int32 [tokens] -> cos, sin: fp32 [tokens, 1, head_dim]."""
        freqs = ops.expand_dims(ops.cast(positions, ms.float32), 1) * self.inv_freq
        emb = ops.concat((freqs, freqs), -1)
        return ops.expand_dims(ops.cos(emb), 1), ops.expand_dims(ops.sin(emb), 1)

    def apply(self, x, cos, sin):
        """x: [tokens, heads, head_dim]."""
        x1 = x[:, :, :self.half]
        x2 = x[:, :, self.half:]
        rotated = ops.concat((-x2, x1), -1)
        return x * cos + rotated * sin
