"""Sampling parameters, and each sequence's seeded generator (the choice itself:
runtime/vocab_sampling.py, next to the logits).

Each sequence has its own sampler and random generator, so a seeded request draws the
same tokens whatever else shares its batch. Ids at or beyond the tokenizer's
vocabulary are never chosen: DeepSeek-Coder's embedding has 32256 rows for 32022 real
tokens, and tp-padding adds more.
"""
from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Optional

import numpy as np

from dsflow.common.errors import DsflowError

MAX_LOGPROBS = 20  # as vLLM's default cap


class SamplingError(DsflowError):
    """Sampling parameters out of range; the message names the option."""


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a chosen token under the model (before temperature/top-k/p),
    and the `top` most likely alternatives, best first."""
    token_id: int
    logprob: float
    top: list = field(default_factory=list)  # [(token_id, logprob)]

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "logprob": self.logprob,
                "top": [[t, lp] for t, lp in self.top]}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; vLLM's names are accepted too (max_tokens)."""
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: Optional[int] = None        # per-sequence generator
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    n: int = 1                        # samples of one prompt sharing its prefill
    logprobs: Optional[int] = None    # None: off; k: chosen token + top-k alternatives
    # vLLM's name for max_new_tokens; init-only, so dataclasses.replace keeps working
    max_tokens: InitVar[Optional[int]] = None

    def __post_init__(self, max_tokens: Optional[int]) -> None:
        if max_tokens is not None:
            object.__setattr__(self, "max_new_tokens", max_tokens)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"--max-new-tokens (max_tokens) {self.max_new_tokens}: "
                                "must be an integer >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"--temperature {self.temperature}: must be a finite number "
                                ">= 0 (0 = greedy)")
        if self.top_k < 0:
            raise SamplingError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise SamplingError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise SamplingError(f"--seed {self.seed}: must be >= 0")
        if any(s == "" for s in self.stop):
            raise SamplingError("--stop: an empty stop string would stop at once")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids {list(self.stop_token_ids)}: must be token "
                                "ids >= 0")
        if not isinstance(self.n, int) or self.n < 1:
            raise SamplingError(f"--n {self.n}: must be an integer >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingError(f"--logprobs {self.logprobs}: must be in 0..{MAX_LOGPROBS}")


def sequence_rng(seed: Optional[int], index: int) -> np.random.Generator:
    """Sample `index` of a request: sample 0 uses the seed as given (a one-sample
    request is reproducible with the plain seed), sample i > 0 the seed and i."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(seed if index == 0 else [seed, index])


class Sampler:
    """One sequence's next-token choice from whole logits rows (one rank holding the
    whole vocabulary), with its own generator: runtime/vocab_sampling.py on one rank.
    The engine does the same split across ranks; this is its single-rank form, for
    callers that hold whole rows."""

    def __init__(self, params: SamplingParams, vocab_limit: int, index: int = 0):
        self.params = params
        self.vocab_limit = vocab_limit
        self.rng = sequence_rng(params.seed, index)

    def draw(self) -> Optional[float]:
        """The uniform of this sequence's next token (None when greedy): one draw per
        sampled token, as numpy's choice took."""
        return None if self.params.temperature == 0.0 else float(self.rng.random())

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [b, >= vocab_limit] -> token ids int32 [b], rows in order."""
        return np.array([self.pick(row)[0] for row in logits], np.int32)

    def pick(self, row: np.ndarray) -> tuple[int, Optional[TokenLogprob]]:
        """One row of logits -> (token id, its logprob entry if asked for)."""
        from dsflow.runtime.vocab_sampling import SampleSpec, sample_rows
        spec = SampleSpec.of(0, self.params, self.draw())
        pick = sample_rows(row[None], 0, self.vocab_limit, [spec], finish=True)[0]
        return pick.token, pick.logprob

