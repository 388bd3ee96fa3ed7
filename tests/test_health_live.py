"""/health runs the model: a rank that hangs (alive and silent) on an idle `dsserve`
turns /health non-200 within 20 s, and the supervisor replaces the worker cluster so
that the server serves again within 180 s (tp = 2, the tiny model)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from test_server_live import START_S, Dsserve, alive

HEALTH_S = 20.0    # SIGSTOP -> /health non-200
SERVING_S = 180.0  # SIGSTOP -> serving again


@pytest.mark.timeout(START_S + SERVING_S + 120)
def test_a_stopped_rank_fails_health_and_the_cluster_is_replaced(export_tiny):
    # a step timeout shorter than MindSpore's own cluster heartbeat: left at the default
    # (60 s), the MindSpore scheduler ends the stopped rank's peer first (observed: rank 0
    # exited with SIGTERM ~30 s after rank 1 was stopped), and the cluster is replaced
    # through that failure instead
    server = Dsserve(export_tiny(2), "--step-timeout", "15")
    stopped = None
    try:
        server.wait_health(ok=True, deadline_s=START_S)
        old = server.ranks()
        assert sorted(old) == [0, 1]
        stopped = old[1]
        os.kill(stopped, signal.SIGSTOP)  # alive, silent: no request is running
        t0 = time.monotonic()
        r = server.wait_health(ok=False, deadline_s=HEALTH_S)
        assert time.monotonic() - t0 <= HEALTH_S
        assert r.status_code == 503 and "step" in r.json()["detail"], r.text
        server.wait_health(ok=True, deadline_s=SERVING_S - (time.monotonic() - t0))
        new = server.ranks()
        assert sorted(new) == [0, 1] and not alive(stopped)
        out = server.client().completions.create(model="tiny-coder", prompt="x =",
                                                 max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
        assert time.monotonic() - t0 <= SERVING_S
        # one line from the cluster says which step and which ranks (the supervisor's
        # restart lines quote it)
        timeouts = [line for line in server.lines
                    if "dsflow.cluster" in line and "exceeded the step timeout" in line]
        assert len(timeouts) == 1, "".join(line for line in server.lines
                                           if "timeout" in line or "dsflow.server:" in line)
    finally:
        if stopped is not None and alive(stopped):
            os.kill(stopped, signal.SIGCONT)
        server.stop()
