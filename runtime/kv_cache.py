"""Batch shapes (padded prompt length, KV-cache length) and the prefill -> decode hand-over.

The decode graph takes a cache whose length (`kv_len`) is chosen per batch. Two policies:

- No buckets (CPU default): the prompt is padded to a multiple of `SEQ_ALIGN` and the
  cache to a multiple of `KV_LEN_ALIGN`, so nearby requests reuse one compiled shape
  (MindSpore compiles each new input shape once, ~0.5 s on CPU).
- Buckets (Ascend; GE compiles one "gear" per bucket): the prompt is padded to the
  smallest bucket that holds it, and the cache to the smallest bucket that holds the
  prompt plus the new tokens. The same list therefore gives the prefill `seq` gears and
  the decode `kv_len` gears, and a request no bucket holds is refused, saying so.

Either way nothing exceeds the manifest's `max_seq_len`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dsflow.common.errors import DsflowError

KV_LEN_ALIGN = 64
SEQ_ALIGN = 16


class CacheLimitError(DsflowError):
    """A request that cannot fit the lengths the artifacts were built for."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _smallest_bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if b >= n:
            return b
    raise CacheLimitError(f"{what} ({n} tokens) fits no shape bucket of these artifacts "
                          f"(largest {max(buckets)}); shorten the request or rebuild with "
                          "larger --buckets")


def plan_shapes(longest_prompt: int, max_new_tokens: int, max_seq_len: int,
                buckets: Optional[Sequence[int]] = None) -> tuple[int, int]:
    """(padded prompt length, cache length) for a batch, or a clear error."""
    need = longest_prompt + max_new_tokens
    if need > max_seq_len:
        raise CacheLimitError(
            f"prompt ({longest_prompt} tokens) + max new tokens ({max_new_tokens}) = {need} "
            f"exceeds the maximum sequence length of these artifacts ({max_seq_len}); "
            "shorten the prompt, lower --max-new-tokens, or rebuild with a larger --max-seq-len")
    if buckets:
        return (_smallest_bucket(longest_prompt, buckets, "the prompt"),
                _smallest_bucket(need, buckets, "prompt + max new tokens"))
    seq = min(round_up(longest_prompt, SEQ_ALIGN), max_seq_len)
    return seq, min(round_up(max(need, seq), KV_LEN_ALIGN), max_seq_len)


def extend_cache(prompt_cache: np.ndarray, kv_len: int) -> np.ndarray:
    """[layers, b, kv_heads, s, hd] from prefill -> zero-padded [..., kv_len, hd]."""
    layers, b, heads, s, hd = prompt_cache.shape
    out = np.zeros((layers, b, heads, kv_len, hd), prompt_cache.dtype)
    out[:, :, :, :min(s, kv_len)] = prompt_cache[:, :, :, :kv_len]
    return out
