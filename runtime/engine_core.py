"""The engine thread: the scheduler plans, the executor runs, the outputs go to their
collectors (as vLLM's engine core: schedule -> execute_model -> update_from_output).

    plan = scheduler.schedule()            # pure policy (runtime/scheduler.py)
    picks = executor.prefill/decode(...)   # the ranks sample (runtime/executor.py)
    updates = scheduler.update(plan, ...)  # stop tokens, max tokens, slot contents
    collector.push(...)                    # token ids only (runtime/outputs.py)

Only this thread talks to the executor. Other threads add requests, abort sequences
and queue exclusive jobs (teacher forcing, the health probe) under `cond`.

Health: the time of the last finished step, and of the one running now, are kept; a
step running longer than `stall_s` means a rank is not answering (a hung collective,
a stopped process), which `health()` reports before the step timeout fails the
cluster. An idle engine runs a one-token probe step every `probe_every_s` when asked
for its health, so an idle server notices a hung rank without traffic.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from dsflow.common.errors import DsflowError
from dsflow.runtime.executor import Executor
from dsflow.runtime.outputs import Collector
from dsflow.runtime.sampling import Sampler, SamplingParams
from dsflow.runtime.scheduler import CANCELLED, Request, Scheduler, StepPlan
from dsflow.runtime.vocab_sampling import SampleSpec
from dsflow.runtime.worker_protocol import StepError, WorkerError

log = logging.getLogger("dsflow.engine")

PROBE_EVERY_S = 3.0   # idle: a probe step when the last step is older than this
STALL_S = 10.0        # a step running longer is reported by health() as stalled


@dataclass
class Live:
    """A submitted prompt as the engine thread knows it."""
    request: Request
    params: SamplingParams
    samplers: list[Sampler]
    collector: Collector
    base: int                 # choice index of its sequence 0 in the collector
    t_submit: float
    t_admit: float = 0.0
    first_done: set = field(default_factory=set)


@dataclass
class Job:
    slots: int
    fn: Callable[[list[int]], object]
    future: concurrent.futures.Future
    probe: bool = False


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, cond: threading.Condition,
                 vocab_limit: int, stall_s: float = STALL_S,
                 probe_every_s: float = PROBE_EVERY_S):
        self.scheduler, self.executor, self.cond = scheduler, executor, cond
        self.vocab_limit = vocab_limit
        self.stall_s, self.probe_every_s = stall_s, probe_every_s
        self.live: dict[str, Live] = {}
        self.jobs: collections.deque[Job] = collections.deque()
        self.closing = False
        self.step_op: Optional[str] = None
        self.step_started: Optional[float] = None
        self.last_step_end = time.monotonic()
        self._probe: Optional[Job] = None

    # ---- any thread, under cond ---------------------------------------------------------
    def add(self, request: Request, params: SamplingParams, collector: Collector,
            base: int) -> None:
        samplers = [Sampler(params, self.vocab_limit, i) for i in range(params.n)]
        self.live[request.request_id] = Live(request, params, samplers, collector, base,
                                             time.perf_counter())
        self.scheduler.add(request)

    def add_job(self, job: Job) -> None:
        self.jobs.append(job)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    def fail_all(self, error: BaseException) -> None:
        """End every request and job with `error` (a dead rank, or the engine closing)."""
        with self.cond:
            self.scheduler.drop_all()
            live, self.live = list(self.live.values()), {}
            jobs, self.jobs = list(self.jobs), collections.deque()
            self.closing = True
        for r in live:
            r.collector.fail(error)
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(error)

    def stalled(self) -> Optional[str]:
        """Why the engine is not answering, if a step has run for longer than stall_s."""
        started = self.step_started
        if started is not None and time.monotonic() - started > self.stall_s:
            return (f"step {self.step_op!r} has run for {time.monotonic() - started:.0f} s "
                    "without every rank answering (a rank hangs?)")
        return None

    def maybe_probe(self) -> None:
        """Idle for probe_every_s: queue a one-token step, so that health reflects a
        real step of every rank (the caller holds cond)."""
        idle = not (self.scheduler.has_work() or self.jobs or self.step_started)
        if idle and self._probe is None and (time.monotonic() - self.last_step_end
                                             > self.probe_every_s):
            self._probe = Job(1, lambda slots: None, concurrent.futures.Future(), probe=True)
            self.jobs.append(self._probe)
            self.cond.notify_all()

    def _run_probe(self, slot: int, position: int) -> None:
        """One token through every rank, written past the slot's cached tokens."""
        self.executor.prefill([(slot, [self.executor.pad_id], position)], [SampleSpec(0)])

    # ---- the engine thread ----------------------------------------------------------------
    def run(self) -> None:
        while self.run_once():
            pass

    def run_once(self) -> bool:
        """Wait for work, then run one step (and an exclusive job whose slots are free).
        False once the engine is closing."""
        with self.cond:
            if not self._wait_for_work():
                return False
            job, slots = None, None
            if self.jobs:
                if self.jobs[0].probe:
                    probe = self.scheduler.reserve_probe()
                    if probe is not None:
                        job = self.jobs.popleft()
                        slots = list(probe)
                else:
                    slots = self.scheduler.reserve(self.jobs[0].slots)
                    if slots is not None:
                        job = self.jobs.popleft()
            plan = self.scheduler.schedule(admit=not self.jobs)
        self._finish_cancelled(plan)
        if job is not None:
            self._run_job(job, slots)
        if not plan.empty:
            self._step(plan)
        return True

    def _wait_for_work(self) -> bool:
        """(Holding cond) until there is work; False when closing."""
        while not (self.closing or self.scheduler.has_work() or self.jobs
                   or self.scheduler.cancelled):
            self.cond.wait()
        return not self.closing

    def _timed(self, op: str, fn: Callable[[], object]) -> object:
        self.step_op, self.step_started = op, time.monotonic()
        try:
            return fn()
        finally:
            self.step_started = None
            self.last_step_end = time.monotonic()

    def _run_job(self, job: Job, slots: list[int]) -> None:
        """slots: the job's slots; for the probe, [slot, position]."""
        fn = (lambda: self._run_probe(*slots)) if job.probe else (lambda: job.fn(slots))
        try:
            job.future.set_result(self._timed("probe" if job.probe else "job", fn))
        except BaseException as e:
            job.future.set_exception(e)
            if isinstance(e, WorkerError) or not isinstance(e, DsflowError):
                raise  # a lost rank or a bug: the engine fails too
        finally:
            with self.cond:
                if job.probe:
                    self.scheduler.release(slots[:1], keep_cache=True)
                    self._probe = None
                else:
                    self.scheduler.release(slots)

    def _finish_cancelled(self, plan: StepPlan) -> None:
        now = time.perf_counter()
        for r, s in plan.finished:
            live = self.live.get(r.request_id)
            if live is not None:
                live.collector.end(live.base + s.index, CANCELLED, now)
        self._forget_done({r.request_id for r, _ in plan.finished})

    def _forget_done(self, request_ids: set[str]) -> None:
        with self.cond:
            for rid in request_ids:
                live = self.live.get(rid)
                if live is not None and live.request.done:
                    del self.live[rid]

    def _specs(self, plan: StepPlan) -> tuple[list[SampleSpec], list[SampleSpec]]:
        """One sampling spec per sampled sequence, with its generator's next draw."""
        prefill = [SampleSpec.of(i, self.live[row.request.request_id].params,
                                 self.live[row.request.request_id].samplers[s.index].draw())
                   for i, row in enumerate(plan.prefill) for s in row.samples]
        decode = [SampleSpec.of(i, self.live[row.request.request_id].params,
                                self.live[row.request.request_id].samplers[row.seq.index].draw())
                  for i, row in enumerate(plan.decode)]
        return prefill, decode

    def _step(self, plan: StepPlan) -> None:
        now = time.perf_counter()
        for r in plan.admitted:
            self.live[r.request_id].t_admit = now
        pre_specs, dec_specs = self._specs(plan)
        try:
            picks = self._timed("step", lambda: self._execute(plan, pre_specs, dec_specs))
        except StepError as e:
            self._fail_step(plan, e)
            return
        with self.cond:
            updates = self.scheduler.update(plan, [p.token for p in picks])
        by_seq = {id(s): p for (_, s), p in zip(plan.sampled(), picks)}
        now = time.perf_counter()
        for u in updates:
            live = self.live[u.request.request_id]
            first = None
            if u.seq.index not in live.first_done:
                live.first_done.add(u.seq.index)
                first = {"t": now, "prefill_ms": (now - live.t_admit) * 1e3,
                         "ttft_ms": (now - live.t_submit) * 1e3}
            live.collector.push(live.base + u.seq.index, u.token, by_seq[id(u.seq)].logprob,
                                u.finish, u.stop_token, now, first)
        self._forget_done({u.request.request_id for u in updates if u.finish})

    def _execute(self, plan: StepPlan, pre_specs, dec_specs) -> list:
        picks = []
        if plan.prefill:
            picks += self.executor.prefill(
                [(row.slot, row.tokens, row.start) for row in plan.prefill], pre_specs)
        for c in plan.copies:
            self.executor.copy_slot(c.src, c.dst, c.length)
        if plan.decode:
            picks += self.executor.decode([row.slot for row in plan.decode],
                                          [row.seq.pending for row in plan.decode],
                                          [row.seq.filled for row in plan.decode], dec_specs)
        return picks

    def _fail_step(self, plan: StepPlan, error: StepError) -> None:
        """The ranks refused this step (its input, a backend error) and serve on: the
        requests in it end with the error; the others go on."""
        log.error("%s", error)
        requests = {id(r): r for r in [row.request for row in plan.prefill]
                    + [row.request for row in plan.decode]}.values()
        with self.cond:
            lives = [self.live[r.request_id] for r in requests if r.request_id in self.live]
            # the other prompts of the same submissions end too: their handle has failed
            failed = {id(live.collector) for live in lives}
            lives += [live for live in self.live.values()
                      if id(live.collector) in failed and live not in lives]
            self.scheduler.drop([live.request for live in lives])
            for live in lives:
                self.live.pop(live.request.request_id, None)
        for collector in {id(live.collector): live.collector for live in lives}.values():
            collector.fail(error)
