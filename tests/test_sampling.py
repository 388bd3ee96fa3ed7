"""Sampling, and the output processor's stop handling (no workers needed)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, require_shared
from dsflow.runtime.outputs import Collector
from dsflow.runtime.sampling import Sampler, SamplingError, SamplingParams


def test_greedy_never_picks_padding_rows():
    logits = np.zeros((2, 40), np.float32)
    logits[:, 35] = 10.0  # best score sits in a padding row
    logits[0, 3] = 1.0
    logits[1, 7] = 2.0
    assert Sampler(SamplingParams(), vocab_limit=30)(logits).tolist() == [3, 7]


def test_sampling_stays_in_vocab_and_top_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    logits[:, 90:] = 50.0
    s = Sampler(SamplingParams(temperature=1.0, top_k=5, seed=1), vocab_limit=90)
    top5 = np.argsort(-logits[:, :90], axis=1)[:, :5]
    for _ in range(20):
        picks = s(logits)
        assert all(p in top5[i] for i, p in enumerate(picks))


def test_seed_reproducible_and_top_p_small_is_greedy():
    logits = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    a = Sampler(SamplingParams(temperature=0.9, seed=7), 50)
    b = Sampler(SamplingParams(temperature=0.9, seed=7), 50)
    assert [a(logits).tolist() for _ in range(5)] == [b(logits).tolist() for _ in range(5)]
    tiny_p = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3), 50)
    assert tiny_p(logits).tolist() == logits.argmax(-1).tolist()


def test_temperature_follows_softmax():
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, seed=0), 3)
    counts = np.bincount([s(logits)[0] for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("params, option", [
    (SamplingParams(max_new_tokens=0), "--max-new-tokens"),
    (SamplingParams(temperature=-1), "--temperature"),
    (SamplingParams(top_p=0.0), "--top-p"),
    (SamplingParams(top_k=-2), "--top-k"),
    (SamplingParams(stop=("",)), "--stop"),
])
def test_bad_parameters_name_the_option(params, option):
    with pytest.raises(SamplingError, match=option):
        params.check()


@pytest.fixture(scope="module")
def tok():
    require_shared()
    from dsflow.runtime.tokenizer import Tokenizer
    return Tokenizer(TOKENIZER_DIR)


def _feed(tok, text, params, eos=False):
    """Push the tokens of `text` as the engine does (max new tokens ends the sequence;
    with eos, an EOS token after them), reading an event after each token."""
    aborted = []
    collector = Collector(tok, [[1]], params, aborted.append)
    events = collector.events()
    pieces = []
    ids = tok.encode(text, add_bos=False)[:params.max_new_tokens]
    for k, t in enumerate(ids):
        last = k + 1 == params.max_new_tokens
        collector.push(0, t, None, "length" if last else None, False, 0.0)
        event = next(events)
        pieces.append(event.text)
        if event.finished is not None:
            return event.finished, pieces, aborted
    if eos:
        collector.push(0, 32021, None, "stop", True, 0.0)
        event = next(events)
        pieces.append(event.text)
        return event.finished, pieces, aborted
    return None, pieces, aborted


def test_stop_string_cuts_output_and_is_never_streamed(tok):
    params = SamplingParams(max_new_tokens=100, stop=("\n\n", "END"))
    c, pieces, aborted = _feed(tok, "def f():\n    return 1\n\nprint(f())", params)
    assert c.finish_reason == "stop"
    assert c.text == "def f():\n    return 1"
    assert "".join(pieces) == c.text
    assert aborted == [0]  # the engine is told to end the sequence


def test_stop_string_split_across_tokens(tok):
    params = SamplingParams(max_new_tokens=100, stop=("STOPHERE",))
    c, pieces, _ = _feed(tok, "abc xSTOPHERE tail", params)
    assert c.text == "abc x" and "".join(pieces) == "abc x"


def test_eos_stops_and_is_not_output(tok):
    c, pieces, aborted = _feed(tok, "hi", SamplingParams(max_new_tokens=10), eos=True)
    assert c.finish_reason == "stop" and 32021 not in c.token_ids and c.text == "hi"
    assert aborted == []  # the engine ended it itself


def test_length_limit(tok):
    c, pieces, _ = _feed(tok, "one two three four five six", SamplingParams(max_new_tokens=3))
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    assert "".join(pieces) == c.text == tok.decode(c.token_ids)


def test_a_lagging_consumer_gets_the_tokens_merged(tok):
    collector = Collector(tok, [[1]], SamplingParams(max_new_tokens=5, n=2), lambda i: None)
    ids = tok.encode(" one two three", add_bos=False)
    for t in ids:
        collector.push(0, t, None, None, False, 0.0)
    collector.push(1, ids[0], None, None, False, 0.0)
    events = collector.events()
    first, second = next(events), next(events)
    assert (first.index, first.token_ids, first.text) == (0, ids, " one two three")
    assert (second.index, second.token_ids) == (1, ids[:1])


def test_split_vocabulary_sampling_equals_whole_row():
    """Every rank's candidates merged give the token the whole row gives, for greedy,
    top-k, top-p, temperature and logprobs, at tp 2 and 4 (a second round where the
    candidates do not decide)."""
    from dsflow.runtime.vocab_sampling import SampleSpec, merge, next_k, rank_candidates
    rng = np.random.default_rng(0)
    vocab, limit = 1024, 1000
    cases = [SamplingParams(), SamplingParams(temperature=0.9, top_k=40),
             SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
             SamplingParams(temperature=1.2, top_k=50, top_p=0.8, logprobs=3),
             SamplingParams(logprobs=5)]
    for scale in (0.1, 3.0, 8.0):
        logits = (rng.normal(size=(4, vocab)) * scale).astype(np.float32)
        logits[:, limit:] = 100.0  # padding rows: never chosen
        for params in cases:
            for row in logits:
                spec = SampleSpec.of(0, params, float(rng.random()))
                whole = merge(spec, [rank_candidates(row, 0, limit, spec, 0)])
                assert whole.token < limit
                for tp in (2, 4):
                    w = vocab // tp
                    parts = [row[r * w:(r + 1) * w] for r in range(tp)]
                    got, k = merge(spec, [rank_candidates(p, r * w, limit, spec)
                                          for r, p in enumerate(parts)]), None
                    while got is None:  # more rounds: more candidates, then all
                        k = next_k(spec, k)
                        got = merge(spec, [rank_candidates(p, r * w, limit, spec, k)
                                           for r, p in enumerate(parts)])
                    assert got.token == whole.token
                    if whole.logprob is not None:
                        assert abs(got.logprob.logprob - whole.logprob.logprob) < 1e-9
                        assert got.logprob.top == whole.logprob.top or all(
                            a[0] == b[0] for a, b in zip(got.logprob.top, whole.logprob.top))
