"""The doctor's model: a two-layer DeepSeek-Coder-architecture checkpoint with seeded
random weights and a byte-level tokenizer, written in well under a second.

Small enough to build and run in seconds on any target, shaped so the fused Ascend
operators accept it (head_dim 16, grouped-query attention, rope scaling as in
DeepSeek-Coder), with weights large enough (std 0.1) that greedy decoding is not a
string of near-ties.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsflow.common.dtypes import f32_to_bf16
from dsflow.export.checkpoint.safetensors import write_safetensors
from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import weight_specs

BYTES = 256
BOS, EOS = "<bos>", "<eos>"
CONFIG = ModelConfig(
    vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8,
    num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=100000.0, rope_scaling_factor=4.0,
    max_position_embeddings=64, bos_token_id=BYTES, eos_token_id=BYTES + 1,
    torch_dtype="bfloat16")
WEIGHT_STD = 0.1


def _tokenizer(out: Path) -> None:
    """One token per byte (no merges to learn) plus BOS/EOS at ids 256/257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": BOS, "eos_token": EOS,
        "model_max_length": CONFIG.max_position_embeddings}) + "\n", encoding="utf-8")


def random_weights(cfg: ModelConfig, seed: int, std: float):
    """(name, bf16 bits, "bfloat16") for every tensor of the plan, seeded; norms are ones."""
    rng = np.random.default_rng(seed)
    for spec in weight_specs(cfg):
        if len(spec.shape) == 1:
            values = np.ones(spec.shape, np.float32)
        else:
            values = rng.normal(0.0, std, spec.shape).astype(np.float32)
        yield spec.name, f32_to_bf16(values), "bfloat16"


def write_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG.to_hf_dict(), indent=2) + "\n")
    write_safetensors(out / "model.safetensors", random_weights(CONFIG, seed, WEIGHT_STD),
                      metadata={"format": "pt"})
    _tokenizer(out)
    return out
