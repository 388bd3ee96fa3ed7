"""The embedded default model: a small DeepSeek-Coder-architecture model shipped inside
the package, so `dsexport build` without --model works on a fresh machine with nothing
trained or downloaded at first use.

The files (config.json, bf16 model.safetensors, the tokenizer it was trained with) are
package data, written by tools/train_default_model.py; docs/DEFAULT_MODEL.md is its
model card.
"""
from __future__ import annotations

from pathlib import Path

from dsflow.common.errors import DsflowError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model_files"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_dir() -> Path:
    """The shipped checkpoint directory; refuses an installation that lacks its files."""
    missing = [f for f in FILES if not (DEFAULT_MODEL_DIR / f).is_file()]
    if missing:
        raise DsflowError(
            f"{DEFAULT_MODEL_DIR}: the embedded default model is incomplete (missing "
            f"{', '.join(missing)}); reinstall dsflow or pass --model")
    return DEFAULT_MODEL_DIR
