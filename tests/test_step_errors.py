"""A backend error for one request's input ends that request with an error; the ranks
keep serving (no restart: a deterministic error would only recur)."""
from __future__ import annotations

import pytest

from conftest import TOKENIZER_DIR, require_shared
from dsflow.runtime import SamplingParams, StepError

T = 120


def test_fake_rank_refusing_a_prompt_fails_only_that_request():
    require_shared()
    from fakes.engine import FakeEngine
    from test_server_http import COMP, serving
    engine = FakeEngine(TOKENIZER_DIR)
    engine.poison = engine.encode("poison", chat=False)[-1]
    try:
        with pytest.raises(StepError, match="fake backend error"):
            engine.submit("poison", SamplingParams(max_new_tokens=3)).result(timeout=T)
        assert engine.health()["state"] == "ready" and engine.restarts == 0
        ok = engine.submit("fine", SamplingParams(max_new_tokens=3)).result(timeout=T)
        assert len(ok[0].token_ids) == 3
        with serving(engine) as s, s.http() as http:
            r = http.post(COMP, json={"prompt": "poison", "max_tokens": 2})
            assert r.status_code == 500 and r.json()["error"]["code"] == "step_failed"
            assert http.get("/health").status_code == 200
            r = http.post(COMP, json={"prompt": "fine", "max_tokens": 2})
            assert r.status_code == 200
        assert engine.restarts == 0
    finally:
        engine.close()


def test_worker_process_answers_a_bad_op_and_serves_on(engine_for):
    engine = engine_for(1)
    pid = engine.cluster.procs["rank0"].pid
    with pytest.raises(StepError, match="rank 0 could not run 'prefill'.*999"):
        engine._call(1, lambda slots: engine.executor.prefill([(999, [1, 2], 0)], None))
    assert engine.health()["state"] == "ready"
    assert engine.cluster.procs["rank0"].pid == pid and engine.cluster.procs["rank0"].poll() is None
    done = engine.submit("x = 1", SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(done.result(timeout=T)[0].token_ids) == 3
