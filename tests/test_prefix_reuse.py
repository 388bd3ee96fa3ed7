"""Prefix reuse: a request that shares a prefix with a finished one prefills only the
rest, and gets exactly the tokens an engine without reuse gives (greedy, seeded n
samples, fill-in-the-middle, chat, chunked prefill, both cache modes, tp 1 and 2)."""
from __future__ import annotations

import pytest

from conftest import SMALL
from dsflow.runtime import Engine, SamplingParams
from test_resident_cache import resident_engine  # noqa: F401 (its fixture, shared)

T = 120
BASE = "import os\nimport sys\n\n\ndef read_config(path):\n    with open(path) as f:\n"
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=7, n=2,
                         ignore_eos=True)
_FRESH: dict = {}


@pytest.fixture(scope="module")
def fresh(export_tiny):
    """tp -> an engine like small_engine_for's, without prefix reuse."""
    def get(tp: int) -> Engine:
        if tp not in _FRESH:
            _FRESH[tp] = Engine(export_tiny(tp), prefix_reuse=False, **SMALL)
        return _FRESH[tp]
    yield get
    for e in _FRESH.values():
        e.close()
    _FRESH.clear()


def requests(engine: Engine) -> list[tuple[list[int], SamplingParams]]:
    """Prompts that share prefixes with each other, in the order they are sent."""
    tok = engine.tokenizer
    chat = [{"role": "user", "content": "sort a list"}]
    chat2 = chat + [{"role": "assistant", "content": "sorted(x)"},
                    {"role": "user", "content": "in reverse"}]
    return [
        (engine.encode(BASE + "        return f.read()\n"), GREEDY),
        (engine.encode(BASE + "        data = f.read()\n"), GREEDY),   # shares BASE
        (engine.encode(BASE + "        data = f.read()\n"), SAMPLED),  # n = 2, all shared
        (engine.encode(BASE, suffix="\n    return data\n"), GREEDY),    # FIM
        (engine.encode(BASE, suffix="\n    return None\n"), GREEDY),    # FIM, same prefix
        (tok.encode(tok.apply_chat_template(chat), add_bos=False), GREEDY),
        (tok.encode(tok.apply_chat_template(chat2), add_bos=False), GREEDY),  # next turn
    ]


def run(engine: Engine, reqs) -> list[list[list[int]]]:
    return [[c.token_ids for c in engine.submit(ids, params).result(timeout=T)]
            for ids, params in reqs]


@pytest.mark.parametrize("tp", [1, 2])
def test_reused_prefixes_give_the_tokens_of_an_engine_without_reuse(tp, small_engine_for,
                                                                   fresh):
    engine = small_engine_for(tp)
    reqs = requests(engine)
    before = engine.health()["prefix_reused_tokens"]
    got = run(engine, reqs)
    reused = engine.health()["prefix_reused_tokens"] - before
    base = len(engine.encode(BASE))
    assert reused >= 3 * (base - 2)  # at least requests 2, 3 and 5 shared the prefix
    assert got == run(fresh(tp), reqs)
    assert fresh(tp).health()["prefix_reused_tokens"] == 0


def test_reuse_without_copy_slot_and_in_the_resident_cache(small_engine_for, fresh,
                                                           resident_engine):  # noqa: F811
    engine = small_engine_for(1)
    reqs = requests(engine)
    expected = run(fresh(1), reqs)
    engine.scheduler.copy_slot = False  # each sample's slot prefilled (Lite, resident GE)
    try:
        assert run(engine, reqs) == expected
    finally:
        engine.scheduler.copy_slot = True
    resident = resident_engine(1)
    before = resident.health()["prefix_reused_tokens"]
    assert run(resident, reqs) == expected
    assert resident.health()["prefix_reused_tokens"] > before
