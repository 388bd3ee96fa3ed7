"""Shared fixtures: tiny random-weight DeepSeek-Coder-shaped checkpoints, their exports
and one running cluster per tensor-parallel degree, shared by the whole session; the
same for the shipped (trained) default model, whose exports tests of numerics share.

Real files from ../shared/models (the DeepSeek-Coder tokenizer and configs) are read
in place, never copied into the repository; set DSFLOW_SHARED to point elsewhere.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# the run fails on an unlisted skip or fewer passes than collected (tests/skip_policy.py)
from skip_policy import (pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401
                         pytest_terminal_summary)

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """$DSFLOW_SHARED, else the nearest `shared/models` beside the checkout or above it."""
    if os.environ.get("DSFLOW_SHARED"):
        return Path(os.environ["DSFLOW_SHARED"])
    for parent in REPO.parents:
        if (parent / "shared" / "models").is_dir():
            return parent / "shared"
    return REPO.parent / "shared"


SHARED = _find_shared()
TOKENIZER_DIR = SHARED / "models" / "deepseek-coder-tokenizer"
CONFIGS_DIR = SHARED / "models" / "configs"
REAL_VOCAB = 32022  # real tokens of the DeepSeek-Coder tokenizer; 32256 embedding rows

# DeepSeek-Coder's shape at toy size: rope theta 1e5, linear scaling 4, GQA (2 groups),
# vocabulary of the real model; tp = 1, 2 and 4 all divide it.
TINY = dict(vocab_size=32256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, rope_theta=100000.0,
            rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=512,
            rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
            bos_token_id=32013, eos_token_id=32021)


def require_shared() -> None:
    if not TOKENIZER_DIR.is_dir():
        pytest.fail(f"{TOKENIZER_DIR} not found: the tests read the real DeepSeek-Coder "
                    "tokenizer from ../shared/models (or set DSFLOW_SHARED)")


def make_hf_checkpoint(path: Path, seed: int = 0, safe: bool = True, dtype=None, **over):
    """Save a random-weight LlamaForCausalLM with the real tokenizer files beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    require_shared()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **over})).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=safe)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / f, path / f)
    return model


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' generate, greedy, never choosing the padding rows (as dsflow)."""
    import torch

    def no_padding_rows(_input_ids, scores):
        scores[:, REAL_VOCAB:] = -float("inf")
        return scores
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         logits_processor=[no_padding_rows], eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-hf")
    make_hf_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype="float32").eval()


_ARTIFACTS: dict[int, Path] = {}
_ENGINES: dict[object, object] = {}
# A small serving engine: 3 slots and 8-token prefill chunks, so tests see requests
# wait for slots and prompts prefilled in several chunks.
SMALL = dict(max_batch=3, prefill_chunk=8)


@pytest.fixture(scope="session")
def export_tiny(tiny_checkpoint, tmp_path_factory):
    """tp -> artifacts directory (built once per tp per session)."""
    from dsflow.export.pipeline.build import BuildOptions, build

    def get(tp: int) -> Path:
        if tp not in _ARTIFACTS:
            out = tmp_path_factory.mktemp(f"art-tp{tp}") / "artifacts"
            _ARTIFACTS[tp] = build(BuildOptions(model_dir=tiny_checkpoint, out=out, tp=tp))
        return _ARTIFACTS[tp]
    return get


@pytest.fixture(scope="session")
def engine_for(export_tiny):
    """tp -> a running Engine on the tiny model: one cluster per tp for the session."""
    from dsflow.runtime.engine import Engine

    def get(tp: int):
        if tp not in _ENGINES:
            _ENGINES[tp] = Engine(export_tiny(tp))
        return _ENGINES[tp]
    yield get
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()


@pytest.fixture(scope="session")
def small_engine_for(export_tiny, engine_for):
    """tp -> a running Engine with SMALL slots/chunks, shared by the session."""
    from dsflow.runtime.engine import Engine

    def get(tp: int):
        key = ("small", tp)
        if key not in _ENGINES:
            _ENGINES[key] = Engine(export_tiny(tp), **SMALL)
        return _ENGINES[key]
    return get


_DEFAULT_ARTIFACTS: dict[int, Path] = {}
_DEFAULT_ENGINES: dict[int, object] = {}


@pytest.fixture(scope="session")
def default_engine(tmp_path_factory):
    """tp -> a running Engine on the shipped default model (fp32 export, built once per
    tp per session)."""
    from dsflow.export.pipeline.build import BuildOptions, build
    from dsflow.export.pipeline.default_model import default_model_dir
    from dsflow.runtime.engine import Engine

    def get(tp: int):
        if tp not in _DEFAULT_ENGINES:
            out = tmp_path_factory.mktemp(f"default-tp{tp}") / "artifacts"
            _DEFAULT_ARTIFACTS[tp] = build(BuildOptions(model_dir=default_model_dir(), out=out,
                                                        tp=tp, max_seq_len=512))
            _DEFAULT_ENGINES[tp] = Engine(_DEFAULT_ARTIFACTS[tp])
        return _DEFAULT_ENGINES[tp]
    yield get
    for engine in _DEFAULT_ENGINES.values():
        engine.close()
    _DEFAULT_ENGINES.clear()
