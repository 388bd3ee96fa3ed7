"""Log-likelihood of a text under exported artifacts, in nats and bits per byte.

Scoring runs through the same prefill/decode graphs as generation (teacher forcing via
`Engine.forced_logits`), so it measures an export, a tensor-parallel degree or a dtype
policy, not a reference implementation. Bits per byte (total code length over the UTF-8
bytes of the text) does not depend on the tokenizer, so models with different
vocabularies and plain compressors (gzip) compare on one scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dsflow.common.errors import DsflowError

DEFAULT_WINDOW = 256  # tokens of context per chunk; the embedded default was trained on 256
CHUNKS_PER_CALL = 8   # forced_logits returns [chunks, window + 1, vocab] float32


@dataclass(frozen=True)
class Score:
    nats: float       # -log-likelihood of all tokens of the text
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    def to_dict(self) -> dict:
        return {"log_likelihood_nats": -self.nats, "tokens": self.tokens, "bytes": self.bytes,
                "nats_per_token": self.nats_per_token, "bits_per_byte": self.bits_per_byte}


def chunks(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive non-overlapping pieces of at most `window` tokens."""
    return [list(ids[i:i + window]) for i in range(0, len(ids), window)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _chunk_nats(engine, pieces: list[list[int]], start_id: int) -> float:
    """-log p of every token of equally long pieces, each predicted from <bos> onwards."""
    logits = engine.forced_logits([[start_id]] * len(pieces), pieces)  # [b, 1 + n, vocab]
    logp = log_softmax(logits[:, :-1])  # position i predicts piece[i]
    target = np.asarray(pieces)[..., None]
    return float(-np.take_along_axis(logp, target, axis=-1).sum())


def default_window(engine) -> int:
    """DEFAULT_WINDOW, or less when the engine's sequences are shorter: a chunk and its
    <bos> must fit one sequence (artifacts built with --max-seq-len 256, or dsrun
    --max-seq-len, hold 255 tokens after the <bos>), so the default never refuses
    itself."""
    return max(1, min(DEFAULT_WINDOW, engine.plan.capacity - 1))


def score_ids(engine, ids: Sequence[int], n_bytes: int, window: Optional[int] = None) -> Score:
    """Score token ids that encode `n_bytes` bytes of text, `window` tokens at a time
    (default: `default_window`): each chunk starts afresh after <bos> (contexts do not
    overlap, so every token is counted once)."""
    window = default_window(engine) if window is None else window
    max_len = engine.plan.capacity
    if not 1 <= window < max_len:
        raise DsflowError(f"--score-window {window}: must be between 1 and "
                          f"{max_len - 1} (the maximum sequence length, {max_len}, minus "
                          "the <bos>)")
    if not ids:
        raise DsflowError("nothing to score: the text is empty")
    start = engine.manifest.config.bos_token_id
    start = engine.pad_id if start is None else start
    pieces = chunks(ids, window)
    full, last = pieces[:-1], pieces[-1]
    if len(last) == window:
        full, last = pieces, []
    nats = sum(_chunk_nats(engine, full[i:i + CHUNKS_PER_CALL], start)
               for i in range(0, len(full), CHUNKS_PER_CALL))
    if last:
        nats += _chunk_nats(engine, [last], start)
    return Score(nats=nats, tokens=len(ids), bytes=n_bytes)


def score_text(engine, text: str, window: Optional[int] = None) -> Score:
    """Log-likelihood of `text` (tokenized without special tokens) under the artifacts."""
    return score_ids(engine, engine.tokenizer.encode(text, add_bos=False),
                     len(text.encode("utf-8")), window)
