"""The embedded default model: a small DeepSeek-Coder-architecture checkpoint made locally.

`dsexport build` without --model builds this, so the first command of the README works
on a fresh machine with nothing downloaded. It has the real architecture and
vocabulary layout (LlamaForCausalLM, rope theta 1e5 with linear scaling 4, grouped-
query attention, 32256 embedding rows for 32022 tokens, bf16 weights, DeepSeek's
special-token ids) at a small size, with seeded random weights: the text it writes is
noise, but every stage of the flow runs for real.

Its tokenizer is a byte-level BPE trained here, in seconds, on the Python standard
library's own source files (the real DeepSeek tokenizer may not be redistributed):
the same files give the same tokenizer (training is deterministic). It is built once
into a cache directory and reused.
"""
from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import weight_specs
from dsflow.common.dtypes import f32_to_bf16
from dsflow.export.checkpoint.safetensors import write_safetensors

VERSION = 1
SEED = 0
BPE_VOCAB = 32000
CORPUS_BYTES = 4_000_000

DEFAULT_CONFIG = ModelConfig(
    vocab_size=32256, hidden_size=512, intermediate_size=1376, num_layers=4,
    num_heads=8, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=100000.0,
    rope_scaling_factor=4.0, max_position_embeddings=16384,
    bos_token_id=32013, eos_token_id=32021, torch_dtype="bfloat16")

# ids 32000.. as in DeepSeek-Coder: 13 reserved slots, then the special tokens
RESERVED = [f"<|reserved_{i}|>" for i in range(13)]
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>",
           "<｜fim▁begin｜>", "<｜fim▁end｜>", "<pad>", "<|User|>", "<|Assistant|>", "<|EOT|>"]

# Same conversation format as DeepSeek-Coder-Instruct, written for this model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}"
    "You are an AI programming assistant.\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n"
    "{% else %}### Response:\n{{ m['content'] }}\n<|EOT|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")


def cache_root() -> Path:
    base = os.environ.get("DSFLOW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsflow")
    return Path(base)


def _corpus() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if "test" in p.parts or "tests" in p.parts or "site-packages" in p.parts:
            continue
        files.append(str(p))
        total += p.stat().st_size
        if total >= CORPUS_BYTES:
            break
    return files


def train_tokenizer(out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json in DeepSeek-Coder's shape."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # DeepSeek-Coder's pre-tokenization: newlines, words, punctuation runs and single
    # digits are split before byte-level BPE.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\r\n]"), "isolated"),
        pre_tokenizers.Split(Regex(r"\s?\p{L}+"), "isolated"),
        pre_tokenizers.Split(Regex(r"\s?\p{P}+"), "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(_corpus(), trainer)
    filler = [f"<|unused_{i}|>" for i in range(BPE_VOCAB - tok.get_vocab_size())]
    tok.add_special_tokens(filler + RESERVED + SPECIAL)
    tok.save(str(out_dir / "tokenizer.json"))
    bos, eos = SPECIAL[0], SPECIAL[-1]
    assert tok.token_to_id(bos) == DEFAULT_CONFIG.bos_token_id
    assert tok.token_to_id(eos) == DEFAULT_CONFIG.eos_token_id
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos,
        "pad_token": SPECIAL[1], "model_max_length": DEFAULT_CONFIG.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def random_weights(cfg: ModelConfig, seed: int = SEED, std: float = 0.02):
    """(name, bf16 bits, "bfloat16") for every tensor of the plan, seeded."""
    rng = np.random.default_rng(seed)
    for spec in weight_specs(cfg):
        if len(spec.shape) == 1:
            values = np.ones(spec.shape, np.float32)
        else:
            values = rng.normal(0.0, std, spec.shape).astype(np.float32)
        yield spec.name, f32_to_bf16(values), "bfloat16"


def write_checkpoint(out_dir: Path, cfg: ModelConfig, seed: int = SEED) -> None:
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    write_safetensors(out_dir / "model.safetensors", random_weights(cfg, seed),
                      metadata={"format": "pt"})


def ensure_default_model(log: Optional[Callable[[str], None]] = None) -> Path:
    """The default checkpoint directory, created on first use (~10 s)."""
    target = cache_root() / f"default-model-v{VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    if log:
        log(f"creating the embedded default model in {target} (first use only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-model-", dir=target.parent))
    try:
        train_tokenizer(tmp)
        write_checkpoint(tmp, DEFAULT_CONFIG)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
