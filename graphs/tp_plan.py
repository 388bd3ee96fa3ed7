"""The tensor-parallel plan: which weight is split along which axis, defined once.

Sharding (export), graph building (parameter shapes per rank), the memory planner
and the docs all derive from `weight_specs`. Layout follows Megatron / vLLM:

- q/k/v and gate/up are *column* parallel: split by output features (axis 0 of the
  HF [out, in] weight), so each rank owns whole attention heads (heads/tp query heads
  and kv_heads/tp KV heads) and needs no communication.
- o_proj and down_proj are *row* parallel: split by input features (axis 1); each
  rank produces a partial sum that an in-graph AllReduce completes.
- lm_head is split over the vocabulary (rows); each rank returns its slice of the
  logits and the coordinator concatenates them, so no collective is needed and the
  largest matmul of a decode step is divided by tp. The vocabulary is zero-padded to
  a multiple of tp; padded logits are discarded by the runtime.
- embed_tokens is replicated. A vocab-parallel embedding would add one AllReduce of
  [tokens, hidden] to every step's critical path for a lookup that does no compute;
  the price of replication is vocab*hidden per rank (462 MB in bf16 for 33B).
- Norm weights are replicated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from dsflow.graphs.config import ModelConfig
from dsflow.common.errors import DsflowError


class Split(str, Enum):
    REPLICATE = "replicate"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"


class TPError(DsflowError):
    """A tensor-parallel degree the model cannot be split by."""


class PlanMismatchError(DsflowError):
    """Rank weights or a rank model that disagree with the TP plan (names the tensor)."""


@dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor: its HF name, full shape and how ranks share it."""

    name: str
    shape: tuple[int, ...]
    split: Split

    @property
    def axis(self) -> int | None:
        return {Split.COLUMN: 0, Split.VOCAB: 0, Split.ROW: 1}.get(self.split)

    def rank_shape(self, tp: int) -> tuple[int, ...]:
        if self.axis is None:
            return self.shape
        shape = list(self.shape)
        shape[self.axis] = math.ceil(shape[self.axis] / tp)
        return tuple(shape)

    def rank_range(self, tp: int, rank: int) -> tuple[int, int, int]:
        """(start, stop, padding) along `axis` of the full tensor for `rank`.

        `padding` rows of zeros follow the data (only for a vocabulary that tp does
        not divide)."""
        if self.axis is None:
            return 0, 0, 0
        size = self.shape[self.axis]
        chunk = math.ceil(size / tp)
        start = min(rank * chunk, size)
        stop = min(start + chunk, size)
        return start, stop, chunk - (stop - start)


def _layer_specs(cfg: ModelConfig, i: int) -> list[WeightSpec]:
    h, hd = cfg.hidden_size, cfg.head_dim
    p = f"model.layers.{i}."
    return [
        WeightSpec(p + "input_layernorm.weight", (h,), Split.REPLICATE),
        WeightSpec(p + "self_attn.q_proj.weight", (cfg.num_heads * hd, h), Split.COLUMN),
        WeightSpec(p + "self_attn.k_proj.weight", (cfg.num_kv_heads * hd, h), Split.COLUMN),
        WeightSpec(p + "self_attn.v_proj.weight", (cfg.num_kv_heads * hd, h), Split.COLUMN),
        WeightSpec(p + "self_attn.o_proj.weight", (h, cfg.num_heads * hd), Split.ROW),
        WeightSpec(p + "post_attention_layernorm.weight", (h,), Split.REPLICATE),
        WeightSpec(p + "mlp.gate_proj.weight", (cfg.intermediate_size, h), Split.COLUMN),
        WeightSpec(p + "mlp.up_proj.weight", (cfg.intermediate_size, h), Split.COLUMN),
        WeightSpec(p + "mlp.down_proj.weight", (h, cfg.intermediate_size), Split.ROW),
    ]


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every tensor of a DeepSeek-Coder checkpoint, in checkpoint order."""
    specs = [WeightSpec("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size),
                        Split.REPLICATE)]
    for i in range(cfg.num_layers):
        specs += _layer_specs(cfg, i)
    specs.append(WeightSpec("model.norm.weight", (cfg.hidden_size,), Split.REPLICATE))
    specs.append(WeightSpec("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), Split.VOCAB))
    return specs


def valid_tp_degrees(cfg: ModelConfig) -> list[int]:
    """Degrees that split heads, KV heads and the MLP evenly."""
    g = math.gcd(math.gcd(cfg.num_heads, cfg.num_kv_heads), cfg.intermediate_size)
    return [d for d in range(1, g + 1) if g % d == 0]


def check_tp(cfg: ModelConfig, tp: int) -> None:
    valid = valid_tp_degrees(cfg)
    if tp not in valid:
        raise TPError(
            f"--tp {tp} does not divide this model evenly ({cfg.num_heads} attention heads, "
            f"{cfg.num_kv_heads} KV heads, intermediate size {cfg.intermediate_size}); "
            f"valid values: {', '.join(map(str, valid))}")


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    """Logit columns the ranks return together (vocab rounded up to a multiple of tp)."""
    return math.ceil(cfg.vocab_size / tp) * tp


@dataclass(frozen=True)
class RankSizes:
    """What one rank holds, derived from the config and tp in this one place.

    The rank model, both kernel sets, the graph signatures, the memory planner and the
    manifest read their per-rank sizes from here; the weight shapes of `weight_specs`
    (`WeightSpec.rank_shape`) agree with them by construction, and `RankModel` checks
    its parameters against the plan when it is built."""

    tp: int
    layers: int
    hidden: int
    head_dim: int
    heads: int          # query heads on this rank
    kv_heads: int       # KV heads on this rank
    groups: int         # query heads per KV head (grouped-query attention)
    ffn: int            # intermediate (MLP) features on this rank
    vocab: int          # logit columns this rank returns (padded vocabulary / tp)
    padded_vocab: int   # logit columns of all ranks together

    @property
    def q_features(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_features(self) -> int:
        return self.kv_heads * self.head_dim


def rank_sizes(cfg: ModelConfig, tp: int) -> RankSizes:
    check_tp(cfg, tp)
    return RankSizes(tp=tp, layers=cfg.num_layers, hidden=cfg.hidden_size,
                     head_dim=cfg.head_dim, heads=cfg.num_heads // tp,
                     kv_heads=cfg.num_kv_heads // tp, groups=cfg.num_groups,
                     ffn=cfg.intermediate_size // tp, vocab=padded_vocab(cfg, tp) // tp,
                     padded_vocab=padded_vocab(cfg, tp))
