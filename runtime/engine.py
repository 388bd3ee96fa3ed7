"""The coordinator and the Python API: open artifacts once, serve many callers at once.

    from dsflow.runtime import Engine, SamplingParams
    with Engine("dsflow-artifacts") as engine:
        for event in engine.stream(["def fib(n):"], SamplingParams(max_new_tokens=64)):
            print(event.text, end="", flush=True)
        results = engine.generate(["# quick sort in C"], SamplingParams(temperature=0.7))
        handle = engine.submit("def add(a, b):", SamplingParams(max_tokens=16))
        print(handle.result()[0].text)

Three parts (docs/DESIGN.md, "Runtime"): the scheduler plans each step
(runtime/scheduler.py, pure policy), the executor runs it on the ranks, which sample
(runtime/executor.py), and the output processor turns tokens into text on the
caller's side (runtime/outputs.py). One engine thread (runtime/engine_core.py) drives
the first two; `submit`, `stream` and `generate` from any number of threads queue
requests that share its steps.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from dsflow.artifacts.manifest import Manifest, read_manifest
from dsflow.common.errors import DsflowError
from dsflow.runtime.cluster import Cluster
from dsflow.runtime.engine_core import STALL_S, EngineCore, Job
from dsflow.runtime.executor import Executor, ProcessExecutor
from dsflow.runtime.generation_config import GenerationConfig
from dsflow.runtime.outputs import (Collector, Completion, EngineClosedError, QueueFullError,
                                    RequestHandle, StreamEvent)
from dsflow.runtime.sampling import SamplingParams
from dsflow.runtime.scheduler import Request, Scheduler
from dsflow.runtime.slot_cache import CacheLimitError
from dsflow.runtime.slot_plan import SlotPlan, plan_slots
from dsflow.runtime.tokenizer import Tokenizer
from dsflow.runtime.worker_protocol import WorkerError

log = logging.getLogger("dsflow.engine")

Prompt = Union[str, Sequence[int]]
SCHEDULING = ("continuous", "static")
DEFAULT_STEP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: every option of dsrun and dsserve that is the engine's,
    declared once (runtime/cli_options.py turns them into command-line options).

    device: "cpu" or "ascend" (default: what the artifacts were built for);
    device_ids: the card of each rank on Ascend (default 0..tp-1).
    max_batch / max_seq_len / cache_mb: how many sequences the KV cache holds at once
    and how long each may grow (`plan_slots`); prefill_chunk: prompt tokens fed per
    step when nothing decodes; max_step_tokens: tokens per step while sequences decode
    (`SlotPlan.prefill_budget`); max_queue: waiting requests beyond which `submit`
    raises QueueFullError; scheduling: "continuous" or "static" (one batch at a time,
    for comparison); prefix_reuse: a request takes the free slot whose cache shares
    the longest prefix with its prompt; step_timeout_s: a step whose ranks have not
    all answered by then fails the cluster (a hung rank); allow_version_mismatch: run
    Lite graphs exported by another MindSpore release.
    """
    verbose: bool = False
    verify: bool = False
    device: Optional[str] = None
    device_ids: Optional[tuple[int, ...]] = None
    max_batch: Optional[int] = None
    max_seq_len: Optional[int] = None
    cache_mb: Optional[float] = None
    prefill_chunk: Optional[int] = None
    max_step_tokens: Optional[int] = None
    max_queue: Optional[int] = None
    scheduling: str = "continuous"
    prefix_reuse: bool = True
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    allow_version_mismatch: bool = False

    def check(self) -> None:
        """Option mistakes that need no artifacts: raised before any file is read."""
        def least(name: str, value, minimum) -> None:
            if value is not None and value < minimum:
                raise DsflowError(f"{name} {value}: must be >= {minimum}")
        least("--max-batch", self.max_batch, 1)
        least("--max-seq-len", self.max_seq_len, 2)
        least("--prefill-chunk", self.prefill_chunk, 1)
        least("--max-step-tokens", self.max_step_tokens, 1)
        least("--max-queue", self.max_queue, 1)
        if self.cache_mb is not None and not self.cache_mb > 0:
            raise DsflowError(f"--cache-mb {self.cache_mb}: must be > 0")
        if not self.step_timeout_s > 0:
            raise DsflowError(f"--step-timeout {self.step_timeout_s}: must be > 0")
        if self.scheduling not in SCHEDULING:
            raise DsflowError(f"scheduling {self.scheduling!r}: choose one of {SCHEDULING}")
        if self.device not in (None, "cpu", "ascend"):
            raise DsflowError(f"--device {self.device}: unknown (choose cpu or ascend)")


def check_device(manifest: Manifest, device: Optional[str],
                 device_ids: Optional[Sequence[int]]) -> str:
    """The device to run on; refuses graphs that cannot run there, before any worker starts."""
    target = manifest.target
    if target == "onnx":  # ONNX Runtime's CPU provider (runtime/backends/onnxrt.py)
        target = "cpu"
    device = device or target
    if device not in ("cpu", "ascend"):
        raise DsflowError(f"--device {device}: unknown (choose cpu or ascend)")
    if device != target:
        why = ("their fused Ascend operators have no CPU kernels" if target == "ascend"
               else "Ascend runs the Lite models built with --target ascend")
        raise DsflowError(f"{manifest.root} was built with --target {manifest.target}; it "
                          f"cannot run on --device {device} ({why}); rebuild with --target "
                          f"{device}")
    if device_ids is not None:
        if device == "cpu":
            raise DsflowError("--devices applies to --device ascend only")
        if len(device_ids) != manifest.tp or len(set(device_ids)) != len(device_ids):
            raise DsflowError(f"--devices needs {manifest.tp} distinct card ids (one per "
                              f"rank, tp={manifest.tp}), got {list(device_ids)}")
    return device


class Engine:
    """Artifacts loaded into tp worker processes, serving requests from many threads."""

    def __init__(self, artifacts: Union[str, Path] = "dsflow-artifacts",
                 options: Optional[EngineOptions] = None, **kwargs):
        """options: EngineOptions, or its fields as keyword arguments."""
        options = options or EngineOptions(**{
            k: tuple(v) if k == "device_ids" and v is not None else v
            for k, v in kwargs.items()})
        options.check()
        self.options = options
        self.manifest: Manifest = read_manifest(artifacts)
        self.manifest.check_signatures()
        if options.verify:
            self.manifest.verify()
        self.device = check_device(self.manifest, options.device, options.device_ids)
        cfg = self.manifest.config
        self.generation = GenerationConfig.read(self.manifest.generation_config_path())
        tokenizer = Tokenizer(self.manifest.tokenizer_dir(),
                              extra_eos_ids=self.generation.eos_ids(cfg.eos_token_id))
        plan = plan_slots(self.manifest, options.max_batch, options.max_seq_len,
                          options.cache_mb, options.prefill_chunk, options.max_step_tokens)
        self._setup(tokenizer, plan, self.generation.default_params(),
                    self.manifest.model_name, cfg.vocab_size)

    def _setup(self, tokenizer: Tokenizer, plan: SlotPlan, default_params: SamplingParams,
               model_name: str, vocab_size: int) -> None:
        """Start serving (also the seam for an engine over another executor: tests)."""
        self.tokenizer = tokenizer
        self.plan = plan
        self.default_params = default_params
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.vocab_limit = min(tokenizer.vocab_size, vocab_size)
        # filler for padded prompt positions: any valid row will do
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id < vocab_size else 0
        self.max_queue = self.options.max_queue
        self.scheduling = self.options.scheduling
        self._cond = threading.Condition()
        self._state, self._detail = "starting", ""
        self.scheduler: Optional[Scheduler] = None
        self.core: Optional[EngineCore] = None
        self.executor: Optional[Executor] = None
        self._thread: Optional[threading.Thread] = None
        self._reused_before = 0  # prefix-reused tokens of earlier clusters
        t0 = time.perf_counter()
        self._start()
        self.startup_s = time.perf_counter() - t0
        log.info("%s", self.plan.describe())

    # ---- lifetime ---------------------------------------------------------------------
    def _make_executor(self) -> Executor:
        """Worker processes for the artifacts' ranks."""
        o = self.options
        cluster = Cluster(self.manifest.root, self.manifest.tp, verbose=o.verbose,
                          device=self.device, device_ids=o.device_ids,
                          allow_version_mismatch=o.allow_version_mismatch).start()
        return ProcessExecutor(cluster, self.plan, self.pad_id, self.vocab_limit,
                               o.step_timeout_s)

    @property
    def cluster(self):
        """The worker processes (a ProcessExecutor's)."""
        return getattr(self.executor, "cluster", None)

    def _start(self) -> None:
        self.executor = self._make_executor()
        try:
            self.executor.configure()
        except BaseException:
            self.executor.close()
            raise
        self.scheduler = Scheduler(self.plan, static=self.scheduling == "static",
                                   copy_slot=self.executor.copy_slot_supported,
                                   prefix_reuse=self.options.prefix_reuse)
        self.core = self._make_core()
        with self._cond:
            self._state, self._detail = "ready", ""
        self._thread = threading.Thread(target=self._run, name="dsflow-engine", daemon=True)
        self._thread.start()

    def _make_core(self) -> EngineCore:
        return EngineCore(self.scheduler, self.executor, self._cond, self.vocab_limit,
                          stall_s=min(STALL_S, self.options.step_timeout_s))

    def _run(self) -> None:
        """The engine thread: steps until closed or failed."""
        core = self.core
        try:
            core.run()
        except BaseException as e:  # a dead rank, or a bug: end every request with it
            if not isinstance(e, (WorkerError, EngineClosedError)):
                log.exception("engine thread failed")
            with self._cond:
                self._state, self._detail = "failed", str(e)
            core.fail_all(e)
            self.executor.close()

    def health(self) -> dict:
        """state "ready" while a step ran recently or runs now and answers; "stalled" when
        a step has waited on a rank too long; "failed" when a rank died. An idle engine
        runs a probe step now and then (EngineCore.maybe_probe), so a hung rank shows
        here without traffic."""
        with self._cond:
            state, detail = self._state, self._detail
            if state == "ready":
                self._notice_dead_worker()
                state, detail = self._state, self._detail
            if state == "ready":
                stalled = self.core.stalled()
                if stalled:
                    state, detail = "stalled", stalled
                else:
                    self.core.maybe_probe()
            s = self.scheduler
            return {"state": state, "detail": detail,
                    "running": s.running_count() if s else 0,
                    "waiting": s.waiting_count() if s else 0,
                    "slots": self.plan.slots,
                    "prefix_reused_tokens": self._reused_before + (s.reused_tokens if s else 0),
                    "last_step_s_ago": round(time.monotonic() - self.core.last_step_end, 3)
                    if self.core else None}

    def _notice_dead_worker(self) -> None:
        """A rank that died while nothing ran shows in health() at once, not only when
        the next request reaches it (servers poll health(), e.g. dsserve's /health)."""
        try:
            self.executor.check_alive()
        except WorkerError as e:
            self._state, self._detail = "failed", str(e)

    def restart(self) -> None:
        """Tear the worker cluster down and start it again (after a failure, or a rank
        that hangs: its processes are killed first)."""
        if self.core is not None and self.core.stalled():
            self.executor.kill()  # the engine thread's step then fails at once
        self._stop(self._restart_reason())
        with self._cond:
            self._state, self._detail = "starting", ""
        try:
            self._start()
        except BaseException as e:
            with self._cond:
                self._state, self._detail = "failed", str(e)
            raise

    def _restart_reason(self) -> BaseException:
        """What requests still in flight at a restart are ended with: the failure that
        caused it when one is known (a supervisor may notice a dead rank through
        health() before the engine thread does, and the client should still learn
        that a rank died), else a plain "restarted"."""
        with self._cond:
            if self._state == "ready" and self.executor is not None:
                self._notice_dead_worker()
            if self._state == "failed" and self._detail:
                return WorkerError(self._detail)
        return EngineClosedError("engine restarted before this request finished")

    def _stop(self, reason: BaseException) -> None:
        if self.core is not None:
            self.core.close()
        if self._thread is not None:
            self._thread.join()
        if self.core is not None:
            self.core.fail_all(reason)
        if self.scheduler is not None:
            self._reused_before += self.scheduler.reused_tokens
            self.scheduler.reused_tokens = 0
        if self.executor is not None:
            self.executor.close()

    def close(self) -> None:
        if self._state == "closed":
            return
        self._stop(EngineClosedError("engine closed before this request finished"))
        with self._cond:
            self._state = "closed"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- prompts ------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False, suffix: Optional[str] = None
               ) -> list[int]:
        """Token ids of a prompt: text (optionally in the chat template, or as the prefix
        of a fill-in-the-middle request with `suffix`) or ids as given."""
        if suffix is not None:
            if not isinstance(prompt, str) or chat:
                raise DsflowError("suffix (fill-in-the-middle) needs a text prompt, not chat")
            return self.tokenizer.encode_fim(prompt, suffix)
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.vocab_size
        if not ids:
            raise DsflowError("empty prompt: give at least one token of text")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise DsflowError(f"prompt token id {bad[0]} is outside the vocabulary "
                              f"(0..{vocab - 1})")
        self.plan.check_fits(len(ids), params)

    # ---- requests -----------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: Optional[SamplingParams] = None, *,
               chat: bool = False, suffix: Optional[str] = None) -> RequestHandle:
        """Queue one prompt (thread-safe); returns at once with its handle. Raises at
        once if it can never fit (CacheLimitError), if the queue is full
        (QueueFullError) or if the engine is closed or failed (EngineClosedError)."""
        return self.submit_many([prompt], params, chat=chat, suffix=suffix)

    def submit_many(self, prompts: Sequence[Prompt], params: Optional[SamplingParams] = None,
                    *, chat: bool = False, suffix: Optional[str] = None) -> RequestHandle:
        """Queue several prompts as one handle whose completion index is
        prompt index * n + sample index (OpenAI's numbering of choices): all are
        queued, or none."""
        params = params or self.default_params
        params.check()  # the one validation of a request's sampling parameters
        ids = [self.encode(p, chat, suffix) for p in prompts]
        if not ids:
            raise DsflowError("empty prompt: give at least one token of text")
        for p in ids:
            self._check_prompt(p, params)
        request_ids = [uuid.uuid4().hex for _ in ids]
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.tokenizer.eos_ids)
        requests = [Request(rid, p, params.n, params.max_new_tokens, stop_ids)
                    for rid, p in zip(request_ids, ids)]

        def abort(index: int) -> None:
            self._abort(collector, request_ids[index // params.n], params.n * (index // params.n),
                        index % params.n)
        collector = Collector(self.tokenizer, ids, params, abort)

        def cancel(_handle: RequestHandle) -> None:
            for p, rid in enumerate(request_ids):
                self._abort(collector, rid, p * params.n)
        handle = RequestHandle(request_ids, ids, params.n, collector, cancel)
        with self._cond:
            self._check_open()
            waiting = self.scheduler.waiting_count()
            if self.max_queue is not None and waiting + len(ids) > self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests already waiting "
                                     "(--max-queue); try again later")
            for p, r in enumerate(requests):
                self.core.add(r, params, collector, p * params.n)
            self._cond.notify_all()
        return handle

    def _abort(self, collector: Collector, request_id: str, base: int,
               index: Optional[int] = None) -> None:
        """End a sequence (or a whole request) in the engine; one still waiting for a
        slot ends at once."""
        with self._cond:
            ended = self.scheduler.abort(request_id, index)
            if ended and ended[0][0].done:  # left the queue: the engine thread forgets it
                self.core.live.pop(request_id, None)
            self._cond.notify_all()
        now = time.perf_counter()
        for _, s in ended:
            collector.end(base + s.index, "cancelled", now)

    def _check_open(self) -> None:
        if self._state != "ready":
            why = f": {self._detail}" if self._detail else ""
            fix = "; call restart()" if self._state == "failed" else ""
            raise EngineClosedError(f"engine is {self._state}{why}{fix}")

    def chat(self, messages: list[dict], params: Optional[SamplingParams] = None
             ) -> Completion:
        """One reply to a multi-turn conversation ([{"role": ..., "content": ...}])."""
        return self.submit(self.tokenizer.encode_messages(messages), params).result()[0]

    def stream(self, prompts: Union[Prompt, Sequence[Prompt]],
               params: Optional[SamplingParams] = None, chat: bool = False,
               suffix: Optional[str] = None) -> Iterator[StreamEvent]:
        """Yield text as it is generated, for every prompt; event/completion index =
        prompt index * n + sample index. Leaving early cancels what is left."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        yield from self.submit_many(prompts, params, chat=chat, suffix=suffix)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Optional[SamplingParams] = None, chat: bool = False,
                 suffix: Optional[str] = None) -> list[Completion]:
        """Every completion of every prompt, in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.submit_many(prompts, params, chat=chat, suffix=suffix).result()

    # ---- exclusive work on the engine thread ------------------------------------------
    def _call(self, slots: int, fn: Callable[[list[int]], object]) -> object:
        """Run fn(slot ids) on the engine thread between steps, with `slots` slots."""
        if slots > self.plan.slots:
            raise CacheLimitError(f"{slots} sequences at once exceed the {self.plan.slots} "
                                  "slots of this engine (--max-batch)")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self.core.add_job(Job(slots, fn, future))
            self._cond.notify_all()
        return future.result()

    def forced_logits(self, prompts: Sequence[Sequence[int]],
                      forced: Sequence[Sequence[int]],
                      prefill_chunk: Optional[int] = None) -> np.ndarray:
        """Logits after each prompt and after each given next token (teacher forcing):
        [batch, 1 + n, vocab]. For parity checks and scoring; all `forced` lists must
        have the same length n. `prefill_chunk` overrides the engine's chunk size."""
        n = len(forced[0]) if forced else 0
        if any(len(f) != n for f in forced) or len(forced) != len(prompts):
            raise DsflowError("forced_logits: one continuation per prompt, all the same length")
        ids = [list(map(int, p)) for p in prompts]
        for p in ids:
            self._check_prompt(p, SamplingParams(max_new_tokens=max(n, 1)))
        chunk = prefill_chunk or self.plan.prefill_chunk
        return self._call(len(ids), lambda slots: self._forced(
            slots, ids, [list(map(int, f)) for f in forced], chunk))

    def _forced(self, slots: list[int], prompts: list[list[int]], forced: list[list[int]],
                chunk: int) -> np.ndarray:
        done = [0] * len(prompts)
        first: list[Optional[np.ndarray]] = [None] * len(prompts)
        while any(d < len(p) for d, p in zip(done, prompts)):
            todo = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            logits = self.executor.prefill(
                [(slots[i], prompts[i][done[i]:done[i] + chunk], done[i]) for i in todo], None)
            for i, row in zip(todo, logits):
                done[i] = min(done[i] + chunk, len(prompts[i]))
                if done[i] == len(prompts[i]):
                    first[i] = row[:self.vocab_size]
        out = [np.stack(first)]
        for step in range(len(forced[0]) if forced else 0):
            out.append(self.executor.decode(slots, [f[step] for f in forced],
                                            [len(p) + step for p in prompts],
                                            None)[:, :self.vocab_size])
        return np.stack(out, axis=1)
