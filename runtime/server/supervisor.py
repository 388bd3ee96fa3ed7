"""Keeping the engine serving: notice a failed worker cluster, restart it with bounded
retries and exponential backoff, and give up (so that systemd or Kubernetes restart
the whole server) when it will not come back.

The state the server reports is this one, not the manifest's: `ready` serves,
`restarting` and `draining` answer 503, `failed` means the server is about to exit.
A failure is noticed either by a request that saw WorkerError (notify_failure) or by
polling engine.health() while idle, so /health turns non-200 even with no traffic:
health() runs a probe step on an idle engine, reports "stalled" (503, no restart yet)
while a step waits on a silent rank, and "failed" once the step timeout has failed
the cluster, which is restarted here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from starlette.concurrency import run_in_threadpool

from dsflow.runtime.server.errors import unavailable
from dsflow.runtime.server.metrics import Metrics

log = logging.getLogger("dsflow.server")

EXIT_ENGINE_LOST = 3  # the exit code after the last restart attempt failed


@dataclass
class RestartPolicy:
    max_restarts: int = 3        # consecutive attempts before giving up
    backoff_s: float = 1.0       # before the 2nd attempt; doubles each time
    stable_s: float = 60.0       # ready this long after a restart: the count starts over
    poll_s: float = 0.5          # engine.health() while nothing else reports


class Supervisor:
    def __init__(self, engine, metrics: Metrics, policy: RestartPolicy = RestartPolicy(),
                 on_fatal: Callable[[int], None] = lambda code: None):
        self.engine = engine
        self.metrics = metrics
        self.policy = policy
        self.on_fatal = on_fatal
        self.state = "ready"
        self.detail = ""
        self.attempts = 0                 # restarts since the engine was last stable
        self.ready_since = time.monotonic()
        self._wake: Optional[asyncio.Event] = None

    # ---- what requests see -------------------------------------------------------
    def admit(self) -> None:
        """Raise the 503 a request gets while the engine cannot take it."""
        if self.state == "ready":
            return
        if self.state == "draining":
            raise unavailable("the server is shutting down", "shutting_down")
        raise unavailable(f"the engine is {self.state}: {self.detail}", "engine_unavailable")

    def notify_failure(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def drain(self) -> None:
        """SIGTERM: admit nothing new; in-flight requests finish (uvicorn's grace period)."""
        self.state = "draining"
        log.warning("draining: no new requests; in-flight ones may finish")

    async def engine_health(self) -> dict:
        """engine.health(), off the event loop; an engine that cannot say is not serving."""
        try:
            return await run_in_threadpool(self.engine.health)
        except Exception as e:
            return {"state": "failed", "detail": f"health(): {e}"}

    # ---- the watch loop ---------------------------------------------------------------
    async def run(self) -> None:
        self._wake = asyncio.Event()
        while self.state not in ("draining", "failed"):
            try:
                await asyncio.wait_for(self._wake.wait(), self.policy.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self.state != "ready":
                continue
            health = await self.engine_health()
            if health.get("state") == "failed":
                await self._recover(health.get("detail", ""))
            elif time.monotonic() - self.ready_since > self.policy.stable_s:
                self.attempts = 0

    async def _recover(self, detail: str) -> None:
        self.state, self.detail = "restarting", detail
        log.error("engine failed (%s); restarting the worker cluster", detail)
        while self.state == "restarting":
            if self.attempts >= self.policy.max_restarts:
                self.state = "failed"
                log.critical("engine did not come back after %d restart(s); exiting with code "
                             "%d so that the supervisor restarts dsserve", self.attempts,
                             EXIT_ENGINE_LOST)
                self.on_fatal(EXIT_ENGINE_LOST)
                return
            if self.attempts:
                delay = self.policy.backoff_s * 2 ** (self.attempts - 1)
                log.warning("restart attempt %d in %.1f s", self.attempts + 1, delay)
                await asyncio.sleep(delay)
            self.attempts += 1
            self.metrics.restarts.inc()
            try:
                await run_in_threadpool(self.engine.restart)
            except Exception as e:  # any failure to start counts as a failed attempt
                self.detail = str(e)
                log.error("restart attempt %d failed: %s", self.attempts, e)
                continue
            if self.state == "restarting":
                self.state, self.detail = "ready", ""
                self.ready_since = time.monotonic()
                log.warning("engine restarted (attempt %d); serving again", self.attempts)

