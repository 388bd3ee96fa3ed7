"""KV-cache sizing and the prefill -> decode hand-over, shared by every backend.

The decode graph takes a cache whose length (`kv_len`) is chosen per batch: the
padded prompt plus the new tokens, rounded up to a multiple of `KV_LEN_ALIGN` so that
nearby requests reuse one compiled shape (MindSpore compiles each new input shape
once, ~0.5 s on CPU), and never above the manifest's `max_seq_len`.
"""
from __future__ import annotations

import numpy as np

from ..graphs.errors import DsflowError

KV_LEN_ALIGN = 64
SEQ_ALIGN = 16


class CacheLimitError(DsflowError):
    """A request that cannot fit the cache length the artifacts were built for."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_prompt_len(longest: int, max_seq_len: int) -> int:
    """Prompt length the batch is right-padded to (fewer distinct prefill shapes)."""
    return min(round_up(longest, SEQ_ALIGN), max_seq_len)


def plan_kv_len(longest_prompt: int, max_new_tokens: int, max_seq_len: int) -> int:
    """Cache length for a batch, or a clear error when the request cannot fit."""
    need = longest_prompt + max_new_tokens
    if need > max_seq_len:
        raise CacheLimitError(
            f"prompt ({longest_prompt} tokens) + max new tokens ({max_new_tokens}) = {need} "
            f"exceeds the maximum sequence length of these artifacts ({max_seq_len}); "
            "shorten the prompt, lower --max-new-tokens, or rebuild with a larger --max-seq-len")
    return min(round_up(max(need, padded_prompt_len(longest_prompt, max_seq_len)),
                        KV_LEN_ALIGN), max_seq_len)


def extend_cache(prompt_cache: np.ndarray, kv_len: int) -> np.ndarray:
    """[layers, b, kv_heads, s, hd] from prefill -> zero-padded [..., kv_len, hd]."""
    layers, b, heads, s, hd = prompt_cache.shape
    out = np.zeros((layers, b, heads, kv_len, hd), prompt_cache.dtype)
    out[:, :, :, :min(s, kv_len)] = prompt_cache[:, :, :, :kv_len]
    return out
