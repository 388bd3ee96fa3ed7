"""health() on an idle engine runs a real one-token step (the probe) through the ranks,
keeps every cached prefix, and reports a step that waits on the ranks too long."""
from __future__ import annotations

import threading
import time

from conftest import TOKENIZER_DIR, require_shared
from dsflow.runtime import SamplingParams

T = 20.0


def test_idle_health_runs_a_probe_step_and_keeps_the_prefix():
    require_shared()
    from fakes.engine import FakeEngine
    engine = FakeEngine(TOKENIZER_DIR, slots=2)
    try:
        engine.submit("def f(x):", SamplingParams(max_new_tokens=2)).result(timeout=T)
        cached = [list(c) for c in engine.scheduler.cached]
        engine.core.probe_every_s = 0.0
        before = engine.core.last_step_end
        assert engine.health()["state"] == "ready"  # queues the probe
        engine.wait_until(lambda: engine.core.last_step_end > before
                          and engine.core._probe is None, T)
        assert engine.scheduler.cached == cached and sorted(engine.scheduler.free) == [0, 1]
        again = engine.submit("def f(x):", SamplingParams(max_new_tokens=2))
        again.result(timeout=T)
        assert engine.health()["prefix_reused_tokens"] > 0
    finally:
        engine.close()


def test_a_step_waiting_on_the_ranks_too_long_is_stalled():
    require_shared()
    from fakes.engine import FakeEngine
    engine = FakeEngine(TOKENIZER_DIR)
    release = threading.Event()
    backend = engine.executor.ops.backend
    decode = backend.decode

    def hung(*args):
        release.wait(T)  # a rank that does not answer until released
        return decode(*args)
    backend.decode = hung
    try:
        engine.core.stall_s = 0.2
        handle = engine.submit("x", SamplingParams(max_new_tokens=3))
        deadline = time.monotonic() + T
        while engine.health()["state"] != "stalled":
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polling health() is what is tested
        assert "decode" in engine.health()["detail"] or "step" in engine.health()["detail"]
        release.set()
        assert len(handle.result(timeout=T)[0].token_ids) == 3
        assert engine.health()["state"] == "ready"
    finally:
        release.set()
        engine.close()
