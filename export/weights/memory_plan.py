"""`dsexport plan`: per-rank memory of serving a model at a tensor-parallel degree.

Every number derives from the single sources of truth: weights from the TP plan
(`rank_shards.rank_weight_bytes`, the very layout `dsexport shard` writes, so the
replicated embedding and the vocabulary padding are included), the KV cache from the
graph signatures' cache layout (`signatures.cache_shape`), the config from
`graphs/config.py`. Activations are an estimate of the prefill peak (docs/WEIGHTS.md):

    T = batch * max_seq tokens, s = bytes per element of --dtype, per rank:
    Hq = heads/tp, Hk = kv_heads/tp, I = intermediate/tp, V = padded vocab/tp
    resident  = 2 * T * hidden * s                      residual stream + normed input
    attention = T * (Hq + 2*Hk) * head_dim * s          q, k, v
              + batch * Hq * max_seq^2 * (s + 4 + s)    scores, fp32 softmax, probs
              + T * Hq * head_dim * s + T * hidden * s  attention output, o_proj sum
    mlp       = 3 * T * I * s + T * hidden * s          gate, up, gate*up, down sum
    logits    = batch * V * 4                           last token only, fp32
    activation = resident + max(attention, mlp) + logits

dsflow's graphs materialise the attention scores (graphs/model.py); with a flash-
attention kernel (Ascend, `--flash-attention`) that term becomes the per-row softmax
statistics, batch * Hq * max_seq * 4 * 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.signatures import BATCH, cache_shape
from dsflow.graphs.tp_plan import check_tp, rank_sizes
from dsflow.export.checkpoint.mapped_file import itemsize
from dsflow.export.weights.rank_files import rank_weight_bytes

ASCEND_910B_HBM = 64 * 2**30  # bytes of HBM per Ascend 910B card


def host_ram_bytes(meminfo: str = "/proc/meminfo") -> int:
    """MemTotal of this machine."""
    with open(meminfo, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo}: no MemTotal line")


@dataclass(frozen=True)
class RankMemory:
    rank: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes


def kv_cache_bytes(cfg: ModelConfig, tp: int, max_seq: int, batch: int, dtype: str) -> int:
    """Keys and values: 2 * layers * batch * kv_heads/tp * max_seq * head_dim * s."""
    elements = 1
    for d in cache_shape(cfg, tp, max_seq):
        elements *= batch if d == BATCH else int(d)
    return 2 * elements * itemsize(dtype)


def activation_bytes(cfg: ModelConfig, tp: int, max_seq: int, batch: int, dtype: str,
                     flash_attention: bool = False) -> int:
    """Prefill peak of one rank (formula in the module docstring)."""
    s, t, h, hd = itemsize(dtype), batch * max_seq, cfg.hidden_size, cfg.head_dim
    sizes = rank_sizes(cfg, tp)
    hq, hk, inter = sizes.heads, sizes.kv_heads, sizes.ffn
    scores = (batch * hq * max_seq * 4 * 2 if flash_attention
              else batch * hq * max_seq * max_seq * (s + 4 + s))
    resident = 2 * t * h * s
    attention = t * (hq + 2 * hk) * hd * s + scores + t * hq * hd * s + t * h * s
    mlp = 3 * t * inter * s + t * h * s
    logits = batch * sizes.vocab * 4
    return resident + max(attention, mlp) + logits


def memory_plan(cfg: ModelConfig, tp: int, max_seq: int, batch: int, dtype: str = "bfloat16",
                flash_attention: bool = False) -> list[RankMemory]:
    check_tp(cfg, tp)
    weights = rank_weight_bytes(cfg, tp, dtype)
    kv = kv_cache_bytes(cfg, tp, max_seq, batch, dtype)
    act = activation_bytes(cfg, tp, max_seq, batch, dtype, flash_attention)
    return [RankMemory(r, weights, kv, act) for r in range(tp)]


def plan_report(cfg: ModelConfig, source: Path, tp: int, max_seq: int, batch: int,
                dtype: str, flash_attention: bool = False) -> dict:
    """The `--json` object: ranks with their bytes and fits, and the whole job's fits
    (every rank on its own 910B; all ranks together in this host's RAM, as on CPU)."""
    ranks = memory_plan(cfg, tp, max_seq, batch, dtype, flash_attention)
    ram = host_ram_bytes()
    total = sum(r.total_bytes for r in ranks)
    return {
        "config": str(source), "tp": tp, "max_seq": max_seq, "batch": batch,
        "dtype": dtype, "flash_attention": flash_attention,
        "ranks": [{**asdict(r), "total_bytes": r.total_bytes,
                   "fits": {"ascend_910b": r.total_bytes <= ASCEND_910B_HBM,
                            "host_ram": r.total_bytes <= ram}} for r in ranks],
        "total_bytes": total,
        "fits": {"ascend_910b": all(r.total_bytes <= ASCEND_910B_HBM for r in ranks),
                 "host_ram": total <= ram},
        "limits": {"ascend_910b_hbm_bytes": ASCEND_910B_HBM, "host_ram_bytes": ram},
    }
