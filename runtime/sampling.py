"""Choosing the next token from the gathered logits (numpy, on the coordinator).

Ids at or beyond the tokenizer's vocabulary are never chosen: DeepSeek-Coder's
embedding has 32256 rows for 32022 real tokens, and tp-padding adds more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dsflow.common.errors import DsflowError


class SamplingError(DsflowError):
    """Sampling parameters out of range; the message names the option."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: Optional[int] = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise SamplingError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise SamplingError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise SamplingError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"--top-p {self.top_p}: must be in (0, 1]")
        if any(s == "" for s in self.stop):
            raise SamplingError("--stop: an empty stop string would stop at once")


class Sampler:
    def __init__(self, params: SamplingParams, vocab_limit: int):
        params.check()
        self.params = params
        self.vocab_limit = vocab_limit
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [b, >= vocab_limit] -> token ids int32 [b]."""
        logits = logits[:, :self.vocab_limit].astype(np.float32, copy=False)
        if self.params.temperature == 0.0:
            return logits.argmax(-1).astype(np.int32)
        return np.array([self._sample_row(row) for row in logits], np.int32)

    def _sample_row(self, row: np.ndarray) -> int:
        p = self.params
        row = row / p.temperature
        order = np.argsort(-row, kind="stable")
        if p.top_k:
            order = order[:p.top_k]
        scores = row[order]
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        return int(order[self.rng.choice(len(probs), p=probs)])
