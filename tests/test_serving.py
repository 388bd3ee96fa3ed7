"""Continuous batching: requests that share decode steps get exactly what they get alone.

Every wait in here is bounded (result(timeout=...), explicit deadlines): a scheduler
bug fails a test instead of hanging the suite.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time

import numpy as np
import pytest
import torch

from conftest import REAL_VOCAB, SMALL
from dsflow.runtime import (CacheLimitError, Engine, EngineClosedError, SamplingParams,
                            WorkerError)
from test_parity import PROMPTS, hf_greedy

T = 120  # seconds any single wait may take on a loaded 2-core machine
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=1234,
                         ignore_eos=True)


def tokens(handle) -> list[int]:
    return handle.result(timeout=T)[0].token_ids


def first_events(handle, k: int):
    """Consume k events (the request is then k steps into its decode). Returns the
    iterator: the caller keeps it, as dropping an iterator early cancels the request."""
    it = iter(handle)
    for _ in range(k):
        next(it)
    return it


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_request_among_others_equals_alone_and_transformers(tp, small_engine_for,
                                                                    hf_model):
    engine = small_engine_for(tp)
    target = engine.encode(PROMPTS[1])  # 20 tokens: three 8-token prefill chunks
    alone = tokens(engine.submit(target, GREEDY))
    with torch.no_grad():
        assert alone == hf_greedy(hf_model, target, GREEDY.max_new_tokens)
    # others: sampled, with a stop string, several samples with logprobs; arriving
    # before and after the target, while it prefills and while it decodes. Each one
    # (seeded) must also get what it gets alone.
    others = {"a": (PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0.8, seed=3,
                                               ignore_eos=True)),
              "b": ("x = [", SamplingParams(max_new_tokens=5, stop=["]"])),
              "c": (PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=1.0, n=2,
                                               logprobs=2, seed=9, ignore_eos=True))}
    solo = {k: [(x.token_ids, x.finish_reason, x.text)
                for x in engine.submit(p, sp).result(timeout=T)]
            for k, (p, sp) in others.items()}
    a = engine.submit(*others["a"])
    reading = iter(a)
    head = [next(reading) for _ in range(3)]  # a is 3 steps in: decoding
    b = engine.submit(*others["b"])
    t = engine.submit(target, GREEDY)
    c = engine.submit(*others["c"])
    assert tokens(t) == alone
    for k, h in (("a", a), ("b", b), ("c", c)):
        assert [(x.token_ids, x.finish_reason, x.text) for x in h.result(timeout=T)] == solo[k]
    assert [len(x[0]) for x in solo["a"] + solo["c"]] == [40, 30, 30]
    assert "".join(e.text for e in head + list(reading)) == solo["a"][0][2]  # a's stream


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(small_engine_for):
    engine = small_engine_for(1)
    alone = tokens(engine.submit(PROMPTS[0], SAMPLED))
    noise = [engine.submit(p, SamplingParams(max_new_tokens=12, temperature=1.0,
                                             ignore_eos=True)) for p in PROMPTS[1:]]
    reading = first_events(noise[0], 2)
    crowded = engine.submit(PROMPTS[0], SAMPLED)
    assert tokens(crowded) == alone
    for h in noise:
        h.result(timeout=T)
    del reading
    pair = [c.token_ids for c in engine.submit(PROMPTS[0], SamplingParams(
        max_new_tokens=16, temperature=0.9, top_k=40, seed=1234, n=2,
        ignore_eos=True)).result(timeout=T)]
    assert pair[0] == alone  # sample 0 uses the seed as given
    again = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=0.9,
                                                     top_k=40, seed=1234, n=2,
                                                     ignore_eos=True))
    assert [c.token_ids for c in again.result(timeout=T)] == pair
    # a backend that cannot copy slots (Lite's device-resident cache) prefills each
    # sample's slot instead: the same samples
    engine.scheduler.copy_slot = False
    try:
        prefilled = engine.submit(PROMPTS[0], SamplingParams(
            max_new_tokens=16, temperature=0.9, top_k=40, seed=1234, n=2, ignore_eos=True))
        assert [c.token_ids for c in prefilled.result(timeout=T)] == pair
    finally:
        engine.scheduler.copy_slot = True


def test_prompt_arriving_among_decodes_is_prefilled_within_the_step_budget(engine_for):
    engine = engine_for(1)  # prefill chunk 256, 64 tokens per step while decoding
    prompt = engine.encode(PROMPTS[1] * 3)  # 60 tokens
    alone = tokens(engine.submit(prompt, GREEDY))
    chunks: list[list[int]] = []
    run_prefill = engine.executor.prefill

    def recording(rows, specs):
        chunks.append([len(t) for _, t, _ in rows])
        return run_prefill(rows, specs)
    engine.executor.prefill = recording
    try:
        busy = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
        reading = first_events(busy, 2)  # decoding now
        assert tokens(engine.submit(prompt, GREEDY)) == alone
        busy.cancel()
        del reading
    finally:
        del engine.executor.prefill
    budget = engine.plan.prefill_budget(1)
    assert budget < len(prompt) <= sum(map(sum, chunks))
    assert max(map(sum, chunks[1:])) <= budget  # chunks[0]: `busy` alone, nothing decoded


def test_chunked_prefill_logits_equal_unchunked(small_engine_for):
    engine = small_engine_for(1)
    prompts = [engine.encode(p) for p in PROMPTS]
    forced = [[5, 6, 7]] * len(prompts)
    whole = engine.forced_logits(prompts, forced, prefill_chunk=512)
    for chunk in (3, 8):
        np.testing.assert_allclose(engine.forced_logits(prompts, forced, prefill_chunk=chunk),
                                   whole, atol=1e-4, rtol=0)


def test_logprobs_are_the_model_log_softmax(small_engine_for):
    engine = small_engine_for(1)
    ids = engine.encode(PROMPTS[0])
    c = engine.submit(ids, SamplingParams(max_new_tokens=4, logprobs=3,
                                          ignore_eos=True)).result(timeout=T)[0]
    logits = engine.forced_logits([ids], [c.token_ids[:3]])[0, :, :REAL_VOCAB]
    top = logits.astype(np.float64).max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    assert len(c.logprobs) == 4
    for step, lp in enumerate(c.logprobs):
        assert lp.token_id == c.token_ids[step] == lp.top[0][0]  # greedy: the best one
        assert [t for t, _ in lp.top] == list(np.argsort(-ref[step])[:3])
        assert abs(lp.logprob - ref[step, lp.token_id]) < 1e-4


def test_more_requests_than_slots_wait_then_complete_sharing_steps(small_engine_for):
    engine = small_engine_for(1)
    prompts = [f"def f{i}(x):" + " pass" * i for i in range(7)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [tokens(engine.submit(p, params)) for p in prompts[:2]]
    steps_before = engine.scheduler.decode_steps
    handles = [engine.submit(p, params) for p in prompts]  # all queued at once
    results = [tokens(h) for h in handles]
    assert all(len(r) == 10 for r in results) and results[:2] == alone
    # each request needs 9 decode rows (its first token comes from the prefill): 63
    # steps if served one after another, 9 if all ran at once. Counted in steps, so a
    # slow machine changes nothing: at most 3 rows a step (the others waited for a
    # slot), and shared steps (3 waves of 9 = 27, a few more if waves overlap unevenly)
    steps = engine.scheduler.decode_steps - steps_before
    rows, slots = 7 * 9, engine.plan.slots
    assert slots == SMALL["max_batch"] == 3
    assert -(-rows // slots) <= steps <= rows // 2, steps


def test_cancel_frees_the_slot(small_engine_for):
    engine = small_engine_for(1)
    long = SamplingParams(max_new_tokens=400, ignore_eos=True)
    busy = [engine.submit("while True:", long) for _ in range(SMALL["max_batch"])]
    reading = [first_events(h, 1) for h in busy]  # all slots taken
    queued = engine.submit("def g():", SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert engine.health()["waiting"] == 1
    busy[0].cancel()
    assert len(queued.result(timeout=T)[0].token_ids) == 3
    done = busy[0].result(timeout=T)[0]
    assert done.finish_reason == "cancelled" and len(done.token_ids) < 400
    for h in busy[1:]:
        h.cancel()
        assert h.result(timeout=T)[0].finish_reason == "cancelled"
    deadline = time.monotonic() + T
    while engine.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.health()["running"] == 0
    del reading


def test_leaving_a_stream_early_cancels(small_engine_for):
    engine = small_engine_for(1)
    handle = engine.submit("for i in range(", SamplingParams(max_new_tokens=300,
                                                            ignore_eos=True))
    for _ in handle:
        break
    assert handle.result(timeout=T)[0].finish_reason == "cancelled"


def test_request_that_cannot_fit_is_refused_at_once(small_engine_for):
    engine = small_engine_for(1)
    busy = engine.submit("while True:", SamplingParams(max_new_tokens=400, ignore_eos=True))
    reading = first_events(busy, 1)  # decoding: the refusals below happen meanwhile
    # refused by submit itself (not queued to fail later): nothing waits, the busy
    # request is still running, and only it ran while they were refused
    with pytest.raises(CacheLimitError, match="exceeds the maximum sequence length"):
        engine.submit([1] * 500, SamplingParams(max_new_tokens=20))
    with pytest.raises(CacheLimitError, match="n = 4 samples"):
        engine.submit("x", SamplingParams(n=4))
    health = engine.health()
    assert health["waiting"] == 0 and health["running"] == 1
    busy.cancel()
    assert busy.result(timeout=T)[0].finish_reason == "cancelled"  # it was still running
    del reading


def test_async_iteration_matches_blocking(small_engine_for):
    engine = small_engine_for(1)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    expected = engine.submit("def h():", params).result(timeout=T)[0]

    async def collect():
        texts = []
        async for event in engine.submit("def h():", params):
            texts.append(event.text)
            if event.finished:
                return "".join(texts), event.finished.token_ids
    text, ids = asyncio.run(asyncio.wait_for(collect(), T))
    assert (text, ids) == (expected.text, expected.token_ids)


def test_chat_messages_and_fill_in_the_middle(small_engine_for):
    engine = small_engine_for(1)
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "sort a list"}]
    reply = engine.chat(messages, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert reply.prompt_token_ids == tok.encode(tok.apply_chat_template(messages),
                                                add_bos=False)
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    ids = engine.encode(prefix, suffix=suffix)
    text = "<｜fim▁begin｜>" + prefix + "<｜fim▁hole｜>" + suffix + "<｜fim▁end｜>"
    assert ids == tok.encode(text)  # BOS, then the FIM tokens as single ids
    assert ids[0] == tok.bos_id and ids[1] == tok._id("<｜fim▁begin｜>")
    done = engine.submit(prefix, SamplingParams(max_new_tokens=2, ignore_eos=True),
                         suffix=suffix).result(timeout=T)[0]
    assert done.prompt_token_ids == ids


def test_old_artifacts_are_refused_with_one_line(export_tiny, tmp_path):
    art = tmp_path / "old"
    shutil.copytree(export_tiny(1), art)
    manifest = art / "manifest.json"
    manifest.chmod(0o644)
    data = json.loads(manifest.read_text())
    data["format_version"] = 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(Exception, match="format version 1 is older.*rebuild") as e:
        Engine(art)
    assert "\n" not in str(e.value)


def test_dying_rank_ends_every_request_then_restart(export_tiny):
    engine = Engine(export_tiny(2), **SMALL)
    try:
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        handles = [engine.submit(p, params) for p in ("a", "b = 1", "while True:", "x")]
        reading = first_events(handles[0], 2)
        engine.cluster.procs["rank1"].kill()
        for h in handles:  # three running, one waiting: all end with the rank named
            with pytest.raises(WorkerError, match="rank1|rank 1"):
                h.result(timeout=T)
        with pytest.raises(WorkerError):
            list(reading)
        assert engine.health()["state"] == "failed"
        with pytest.raises(EngineClosedError, match="restart"):
            engine.submit("y", params)
        engine.restart()
        assert engine.health()["state"] == "ready"
        again = engine.submit("a", SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(again.result(timeout=T)[0].token_ids) == 4
    finally:
        engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit("z")


def test_generation_config_travels_and_applies(small_engine_for, tmp_path):
    from dsflow.runtime.generation_config import GenerationConfig
    engine = small_engine_for(1)
    assert (engine.manifest.root / "generation_config.json").is_file()  # from the build
    assert engine.generation.eos_ids(None) == [32021]
    listed = GenerationConfig({"eos_token_id": [32021, 32014], "do_sample": True,
                               "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 77})
    assert listed.eos_ids(32021) == [32021, 32014]  # a list stays a list
    params = listed.default_params()
    assert (params.temperature, params.top_k, params.top_p, params.max_new_tokens) == \
        (0.6, 50, 0.9, 77)  # transformers' top_k default when the file has none
    assert GenerationConfig({}).default_params() == SamplingParams()
