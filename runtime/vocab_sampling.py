"""Choosing the next token where the logits are, with the vocabulary split across ranks.

The lm_head is vocab-parallel: rank r holds the logits of ids r*w .. (r+1)*w-1. Rather
than sending every rank's slice to the coordinator (batch x vocab floats a step), each
rank reduces its slice to what sampling needs (`rank_candidates`): its best
candidates, sorted, and the log-sum-exp of its slice. `merge` finishes the choice from
those of all ranks. It is exact:
- greedy: the best of the ranks' best (ties to the lowest id, as numpy's argmax);
- top-k: every rank sends its k best, so the merged k best are the global k best; the
  probabilities are then computed from those k scores exactly as a whole row would be;
- top-p and plain temperature sampling: the nucleus (or the draw) may need more than
  the candidates sent. The global mass of each candidate is known from the ranks'
  log-sum-exp, so `merge` sees whether the merged prefix decides the token; when it
  does not (a long nucleus, a flat distribution, the draw within rounding of a
  boundary), the coordinator asks again for that row: MORE_CANDIDATES, then, if still
  undecided, the whole slice (sent as bare logits);
- logprobs: log-softmax from the global log-sum-exp, and the top ones from each
  rank's own top ones.
The random draw is one uniform per sampled token, from the sequence's own seeded
generator (runtime/sampling.py sequence_rng), taken on the coordinator: numpy's
`Generator.choice(len(p), p=p)` is `searchsorted(cumsum(p) / sum, random(), "right")`,
so the same seed gives the same tokens as sampling the whole row did.

Ids at or beyond `vocab_limit` (tp padding, embedding rows the tokenizer does not use)
are never candidates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from dsflow.runtime.sampling import SamplingParams, TokenLogprob

# candidates per rank for top-p / plain temperature sampling; more only when needed:
# MORE_CANDIDATES in a second round, then the whole slice
CANDIDATES = 64
MORE_CANDIDATES = 1024
# a draw or a nucleus bound this close to a cumulative-mass boundary is decided on the
# whole row (float32 rounding of the whole-row computation is ~1e-6 at 32K ids)
EDGE = 1e-5


@dataclass(frozen=True)
class SampleSpec:
    """One token to choose from logits row `row`; `u` is the sequence's uniform draw
    (None for greedy)."""
    row: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    logprobs: Optional[int] = None
    u: Optional[float] = None

    @classmethod
    def of(cls, row: int, params: SamplingParams, u: Optional[float]) -> "SampleSpec":
        return cls(row, params.temperature, params.top_k, params.top_p, params.logprobs,
                   u if params.temperature > 0 else None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def wanted(self) -> int:
        """Candidates a rank sends in the first round."""
        if self.greedy:
            return 1
        return self.top_k or CANDIDATES


@dataclass
class RankCandidates:
    """One rank's reduction of one logits row: its best ids by scaled logit (ties to the
    lowest id), their raw and scaled logits, and the log-sum-exp terms of its slice. A
    whole slice (`full`) travels as its raw logits only: ids and scaled logits are
    recomputed where it is merged (`expand`)."""
    ids: Optional[np.ndarray]       # int32, global ids (None: offset + arange, full)
    raw: np.ndarray                 # float32
    scaled: Optional[np.ndarray]    # float32: raw / temperature (raw when greedy)
    full: bool                      # every valid id of the slice is here
    offset: int = 0
    scaled_max: float = -np.inf     # top-p / temperature rows: sum exp(scaled - max)
    scaled_sum: float = 0.0
    raw_max: float = -np.inf        # logprobs rows: sum exp(raw - max), and the top ones
    raw_sum: float = 0.0
    lp_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    lp_raw: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def expand(self, spec: "SampleSpec") -> "RankCandidates":
        """Ids and scaled logits of a whole slice sent bare (the same float32 division
        as on the rank, so the same values)."""
        if self.ids is None:
            self.ids = (np.arange(len(self.raw)) + self.offset).astype(np.int32)
            self.scaled = (self.raw if spec.greedy
                           else self.raw / np.float32(spec.temperature))
        return self


@dataclass(frozen=True)
class Pick:
    token: int
    logprob: Optional[TokenLogprob] = None


def best(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, best first, ties to the lowest index (the order
    of np.argsort(-values, kind="stable")[:k], without sorting the whole row).

    A whole-row argpartition costs ~0.4 ms at 32K ids; instead the k-th largest of every
    8th value is a threshold that at least k values reach, so every one of the k
    largest (and every tie of the k-th) is among the few values at or above it."""
    n = len(values)
    if k >= n:
        return np.argsort(-values, kind="stable")
    if k == 1:  # greedy: argmax is the first of the best already
        return np.array([int(values.argmax())])
    if n >= 64 * k:
        sample = values[::8]
        threshold = np.partition(sample, len(sample) - k)[len(sample) - k]
        sel = np.flatnonzero(values >= threshold)
    else:
        sel = np.arange(n)
    return sel[np.argsort(-values[sel], kind="stable")][:k]


def _lse_terms(x: np.ndarray) -> tuple[float, float]:
    if not len(x):
        return -np.inf, 0.0
    m = float(x.max())
    return m, float(np.exp(x.astype(np.float64) - m).sum())


def rank_candidates(row: np.ndarray, offset: int, vocab_limit: int, spec: SampleSpec,
                    k: Optional[int] = None) -> RankCandidates:
    """Reduce one rank's logits slice (ids offset..) to what `merge` needs for `spec`:
    its `k` best (default spec.wanted(); 0: the whole slice)."""
    valid = max(0, min(len(row), vocab_limit - offset))
    x = np.asarray(row[:valid], dtype=np.float32)
    scaled = x if spec.greedy else x / np.float32(spec.temperature)
    k = spec.wanted() if k is None else k
    if k == 0 or k >= valid:
        c = RankCandidates(None, x, None, True, offset)
    else:
        top = best(scaled, k)
        c = RankCandidates((top + offset).astype(np.int32), x[top], scaled[top], False,
                           offset)
    if not spec.greedy and not spec.top_k:
        c.scaled_max, c.scaled_sum = _lse_terms(scaled)
    if spec.logprobs is not None:
        c.raw_max, c.raw_sum = _lse_terms(x)
        lp = best(x, min(spec.logprobs, valid))
        c.lp_ids, c.lp_raw = (lp + offset).astype(np.int32), x[lp]
    return c


def _whole_row_draw(scores: np.ndarray, top_p: float, u: float) -> int:
    """Position of the token drawn from `scores` (scaled logits, best first), computed
    exactly as sampling.Sampler always did on a whole row (float32 probabilities,
    nucleus cut, then numpy's choice with the draw u)."""
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
    cdf = probs.astype(np.float64).cumsum()
    cdf /= cdf[-1]
    return int(cdf.searchsorted(u, side="right"))


def _prefix_draw(scores: np.ndarray, ranks: Sequence[RankCandidates], top_p: float,
                 u: float) -> Optional[int]:
    """Position of the token drawn, from the exact global top of the row only, using
    the global mass from the ranks' log-sum-exp; None if the prefix does not decide it."""
    m = max(r.scaled_max for r in ranks)
    z = sum(r.scaled_sum * np.exp(r.scaled_max - m) for r in ranks if r.scaled_sum)
    cum = np.cumsum(np.exp(scores.astype(np.float64) - m) / z)
    if top_p < 1.0:
        if cum[-1] < top_p + EDGE:
            return None
        keep = int(np.searchsorted(cum, top_p)) + 1
        if abs(cum[keep - 1] - top_p) < EDGE or (keep > 1 and abs(cum[keep - 2] - top_p)
                                                 < EDGE):
            return None
        cum = cum[:keep] / cum[keep - 1]
    elif cum[-1] <= u + EDGE:
        return None
    pos = int(cum.searchsorted(u, side="right"))
    if pos >= len(cum) or abs(cum[pos] - u) < EDGE or (pos and abs(cum[pos - 1] - u) < EDGE):
        return None
    return pos


def merge(spec: SampleSpec, ranks: Sequence[RankCandidates]) -> Optional[Pick]:
    """The token (and logprob entry) from every rank's candidates, in rank order; None
    when the candidates do not decide it: ask the ranks again for more (`next_k`)."""
    ranks = [r.expand(spec) for r in ranks]
    ids = np.concatenate([r.ids for r in ranks])
    scaled = np.concatenate([r.scaled for r in ranks])
    order = np.lexsort((ids, -scaled))  # best first, ties to the lowest id
    if spec.greedy:
        pos = 0
    elif spec.top_k:
        pos = _whole_row_draw(scaled[order[:spec.top_k]], spec.top_p, spec.u)
    elif all(r.full for r in ranks):
        pos = _whole_row_draw(scaled[order], spec.top_p, spec.u)
    else:
        # beyond the shortest list a rank sent, its next best may be missing
        order = order[:min(len(r.ids) for r in ranks if not r.full)]
        found = _prefix_draw(scaled[order], ranks, spec.top_p, spec.u)
        if found is None:
            return None
        pos = found
    token = int(ids[order[pos]])
    if spec.logprobs is None:
        return Pick(token)
    raw = np.concatenate([r.raw for r in ranks])
    return Pick(token, _logprob(ranks, token, float(raw[order[pos]]), spec.logprobs))


def _logprob(ranks: Sequence[RankCandidates], token: int, logit: float, top: int
             ) -> TokenLogprob:
    m = max(r.raw_max for r in ranks)
    lse = m + np.log(sum(r.raw_sum * np.exp(r.raw_max - m) for r in ranks if r.raw_sum))
    ids = np.concatenate([r.lp_ids for r in ranks])
    raw = np.concatenate([r.lp_raw for r in ranks])
    order = np.lexsort((ids, -raw))[:top]
    return TokenLogprob(token, float(np.float64(logit) - lse),
                        [(int(ids[i]), float(np.float64(raw[i]) - lse)) for i in order])


def sample_rows(logits: np.ndarray, offset: int, vocab_limit: int,
                specs: Sequence[SampleSpec], finish: bool) -> list:
    """A rank's answer for a step: with `finish` (the whole vocabulary is here, tp = 1)
    the picks themselves; else its candidates for `merge` on the coordinator."""
    if not finish:
        return [rank_candidates(logits[s.row], offset, vocab_limit, s) for s in specs]
    picks = []
    for s in specs:
        pick = merge(s, [rank_candidates(logits[s.row], offset, vocab_limit, s)])
        if pick is None:  # no pipe in between: the whole row at once
            pick = merge(s, [rank_candidates(logits[s.row], offset, vocab_limit, s, 0)])
        picks.append(pick)
    return picks


def next_k(spec: SampleSpec, k: Optional[int]) -> int:
    """Candidates to ask for after `k` (None: the first round's) did not decide:
    MORE_CANDIDATES, then the whole slice (0)."""
    return MORE_CANDIDATES if k is None and spec.wanted() < MORE_CANDIDATES else 0
