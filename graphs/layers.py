"""Parameter-holding building blocks shared by every target.

These cells own the weights (so parameter names and shapes never depend on the target);
the arithmetic that differs between targets lives in the kernel sets
(graphs/kernels/portable.py, graphs/kernels/ascend.py).

Performance note, measured on MindSpore 2.10 CPU: `ops.matmul` of a 3-D activation
by a 2-D weight broadcasts (copies) the whole weight on every call, which made decode
3.5x slower. Every projection here flattens tokens to 2-D and uses the `MatMul`
primitive with `transpose_b=True`, which reads the HF [out, in] weight in place.
"""
from __future__ import annotations

from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.common.initializer import Zero

# The communication group baked into exported graphs. Ascend's native world group;
# the CPU worker creates a group of this name over all ranks after init().
WORLD_GROUP = "hccl_world_group"


def weight(shape: tuple[int, ...], dtype) -> Parameter:
    """A parameter declared by shape only; data is loaded afterwards.

    Its name comes from where it sits in the cell tree, which mirrors the HF module
    tree, so the exported parameter names are the checkpoint's tensor names."""
    return Parameter(Tensor(shape=shape, dtype=dtype, init=Zero()), requires_grad=False)


def iota_like(t):
    """0, 1, ..., n-1 as int32 for a 1-D tensor `t` of length n, whatever t's dtype
    (works with a dynamic n).

    Always int32: a count kept in the compute dtype stops at 2048 in fp16 (256 in
    bf16), so slot indices built from a cache tensor silently collided past 2K tokens
    (issue 7). Indices, positions and lengths never pass through a float here."""
    return ops.cumsum(ops.ones_like(t, dtype=mstype.int32), 0) - 1


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
    """Holds the norm weight (HF name `...layernorm.weight`); `kernel(x, weight)` computes.

    The kernel is a parameter-free cell of the target's kernel set, so swapping targets
    never changes the parameter tree."""

    def __init__(self, size: int, dtype, kernel: nn.Cell):
        super().__init__()
        self.weight = weight((size,), dtype)
        self.kernel = kernel

    def construct(self, x):
        return self.kernel(x, self.weight)


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
