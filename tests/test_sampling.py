"""Sampling and stop handling on the coordinator (no workers needed)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, require_shared
from dsflow.runtime.requests import Completion, _SequenceState
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


def _feed(tok, text, params):
    state = _SequenceState(Completion(0, [1]), tok, params)
    pieces = []
    for t in tok.encode(text, add_bos=False):
        pieces.append(state.add(t))
        if state.done:
            break
    return state, pieces


def test_stop_string_cuts_output_and_is_never_streamed(tok):
    params = SamplingParams(max_new_tokens=100, stop=("\n\n", "END"))
    state, pieces = _feed(tok, "def f():\n    return 1\n\nprint(f())", params)
    assert state.c.finish_reason == "stop"
    assert state.c.text == "def f():\n    return 1"
    assert "".join(pieces) == state.c.text


def test_stop_string_split_across_tokens(tok):
    params = SamplingParams(max_new_tokens=100, stop=("STOPHERE",))
    state, pieces = _feed(tok, "abc xSTOPHERE tail", params)
    assert state.c.text == "abc x" and "".join(pieces) == "abc x"


def test_eos_stops_and_is_not_output(tok):
    state = _SequenceState(Completion(0, [1]), tok, SamplingParams(max_new_tokens=10))
    state.add(tok.encode("hi", add_bos=False)[0])
    state.add(32021)
    assert state.c.finish_reason == "stop" and 32021 not in state.c.token_ids


def test_length_limit(tok):
    state, pieces = _feed(tok, "one two three four five six", SamplingParams(max_new_tokens=3))
    assert state.c.finish_reason == "length" and len(state.c.token_ids) == 3
    assert "".join(pieces) == state.c.text == tok.decode(state.c.token_ids)
