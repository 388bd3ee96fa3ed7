"""The coordinator and the Python API: open artifacts once, serve many callers at once.

    from dsflow.runtime import Engine, SamplingParams
    with Engine("dsflow-artifacts") as engine:
        for event in engine.stream(["def fib(n):"], SamplingParams(max_new_tokens=64)):
            print(event.text, end="", flush=True)
        results = engine.generate(["# quick sort in C"], SamplingParams(temperature=0.7))
        handle = engine.submit("def add(a, b):", SamplingParams(max_tokens=16))
        print(handle.result()[0].text)

Continuous batching: one engine thread owns the worker cluster and runs the
iteration-level scheduler (runtime/scheduler.py); `submit`, `stream` and `generate`
from any number of threads queue requests that share its decode steps.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from dsflow.artifacts.manifest import Manifest, read_manifest
from dsflow.common.errors import DsflowError
from dsflow.runtime.cluster import Cluster
from dsflow.runtime.generation_config import GenerationConfig
from dsflow.runtime.protocol import WorkerError
from dsflow.runtime.requests import (Completion, EngineClosedError, QueueFullError,
                                     RequestHandle, StreamEvent)
from dsflow.runtime.sampling import SamplingParams
from dsflow.runtime.scheduler import Scheduler, SlotPlan, plan_slots
from dsflow.runtime.slot_cache import CacheLimitError
from dsflow.runtime.tokenizer import Tokenizer

log = logging.getLogger("dsflow.engine")

Prompt = Union[str, Sequence[int]]
SCHEDULING = ("continuous", "static")


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

    def __init__(self, artifacts: Union[str, Path] = "dsflow-artifacts", verbose: bool = False,
                 verify: bool = False, device: Optional[str] = None,
                 device_ids: Optional[Sequence[int]] = None, max_batch: Optional[int] = None,
                 max_seq_len: Optional[int] = None, cache_mb: Optional[float] = None,
                 prefill_chunk: Optional[int] = None, max_step_tokens: Optional[int] = None,
                 max_queue: Optional[int] = None, scheduling: str = "continuous"):
        """device: "cpu" or "ascend" (default: what the artifacts were built for);
        device_ids: the card of each rank on Ascend (default 0..tp-1).
        max_batch / max_seq_len / cache_mb: how many sequences the KV cache holds at once
        and how long each may grow (see `plan_slots`); prefill_chunk: prompt tokens fed
        per step when nothing decodes (long prompts take several steps);
        max_step_tokens: tokens per step while sequences decode, decodes first and
        prompt chunks in the rest (`SlotPlan.prefill_budget`);
        max_queue: waiting requests beyond which `submit` raises QueueFullError;
        scheduling: "continuous" (join and leave the running batch at every step) or
        "static" (one batch at a time: admit only when nothing runs; for comparison)."""
        self.manifest: Manifest = read_manifest(artifacts)
        self.manifest.check_signatures()
        if verify:
            self.manifest.verify()
        self.device = check_device(self.manifest, device, device_ids)
        if scheduling not in SCHEDULING:
            raise DsflowError(f"scheduling {scheduling!r}: choose one of {SCHEDULING}")
        if max_queue is not None and max_queue < 1:
            raise DsflowError(f"--max-queue {max_queue}: must be >= 1")
        cfg = self.manifest.config
        self.generation = GenerationConfig.read(self.manifest.generation_config_path())
        self.tokenizer = Tokenizer(self.manifest.tokenizer_dir(),
                                   extra_eos_ids=self.generation.eos_ids(cfg.eos_token_id))
        self.default_params = self.generation.default_params()
        self.model_name = self.manifest.model_name
        self.plan: SlotPlan = plan_slots(self.manifest, max_batch, max_seq_len, cache_mb,
                                         prefill_chunk, max_step_tokens)
        self.scheduling = scheduling
        self.max_queue = max_queue
        self._options = dict(verbose=verbose, device_ids=device_ids)
        self._cond = threading.Condition()
        self._state, self._detail = "starting", ""
        self.scheduler: Optional[Scheduler] = None
        self._thread: Optional[threading.Thread] = None
        t0 = time.perf_counter()
        self._start()
        self.startup_s = time.perf_counter() - t0
        log.info("%s", self.plan.describe())

    # ---- lifetime ---------------------------------------------------------------------
    def _start(self) -> None:
        self.cluster = Cluster(self.manifest.root, self.manifest.tp,
                               verbose=self._options["verbose"], device=self.device,
                               device_ids=self._options["device_ids"]).start()
        try:
            replies = self.cluster.request("configure", {"slots": self.plan.slots,
                                                         "capacity": self.plan.capacity})
        except BaseException:
            self.cluster.close()
            raise
        self.scheduler = Scheduler(self.cluster, self.plan, self.tokenizer, self.manifest,
                                   self.scheduling, self._cond,
                                   copy_slot=all(r.get("copy_slot", True) for r in replies))
        with self._cond:
            self._state, self._detail = "ready", ""
        self._thread = threading.Thread(target=self._run, name="dsflow-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """The engine thread: scheduler steps until closed or failed."""
        try:
            self.scheduler.run()
        except BaseException as e:  # a dead rank, or a bug: end every request with it
            if not isinstance(e, (WorkerError, EngineClosedError)):
                log.exception("engine thread failed")
            with self._cond:
                self._state, self._detail = "failed", str(e)
            self.scheduler.fail_all(e)
            self.cluster.close()

    def health(self) -> dict:
        with self._cond:
            if self._state == "ready":
                self._notice_dead_worker()
            s = self.scheduler
            return {"state": self._state, "detail": self._detail,
                    "running": s.running_count() if s else 0,
                    "waiting": s.waiting_count() if s else 0,
                    "slots": self.plan.slots}

    def _notice_dead_worker(self) -> None:
        """A rank that died while nothing ran shows in health() at once, not only when
        the next request reaches it (servers poll health(), e.g. dsserve's /health)."""
        try:
            self.cluster.check_alive()
        except WorkerError as e:
            self._state, self._detail = "failed", str(e)

    def restart(self) -> None:
        """Tear the worker cluster down and start it again (after a failure)."""
        self._stop(EngineClosedError("engine restarted before this request finished"))
        with self._cond:
            self._state, self._detail = "starting", ""
        try:
            self._start()
        except BaseException as e:
            with self._cond:
                self._state, self._detail = "failed", str(e)
            raise

    def _stop(self, reason: BaseException) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self._thread is not None:
            self._thread.join()
        if self.scheduler is not None:
            self.scheduler.fail_all(reason)
        self.cluster.close()

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
        vocab = self.manifest.config.vocab_size
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
        params = params or self.default_params
        params.check()
        ids = self.encode(prompt, chat, suffix)
        self._check_prompt(ids, params)
        handle = RequestHandle(uuid.uuid4().hex, ids, params.n, self._wake)
        with self._cond:
            self._check_open()
            if self.max_queue is not None and self.scheduler.waiting_count() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests already waiting "
                                     "(--max-queue); try again later")
            self.scheduler.add(handle, params)
            self._cond.notify_all()
        return handle

    def _check_open(self) -> None:
        if self._state != "ready":
            why = f": {self._detail}" if self._detail else ""
            fix = "; call restart()" if self._state == "failed" else ""
            raise EngineClosedError(f"engine is {self._state}{why}{fix}")

    def _wake(self, _handle: RequestHandle) -> None:
        with self._cond:
            self._cond.notify_all()

    def chat(self, messages: list[dict], params: Optional[SamplingParams] = None
             ) -> Completion:
        """One reply to a multi-turn conversation ([{"role": ..., "content": ...}])."""
        text = self.tokenizer.apply_chat_template(messages)
        ids = self.tokenizer.encode(text, add_bos=False)
        return self.submit(ids, params).result()[0]

    def stream(self, prompts: Union[Prompt, Sequence[Prompt]],
               params: Optional[SamplingParams] = None, chat: bool = False
               ) -> Iterator[StreamEvent]:
        """Yield text as it is generated, for every prompt; event/completion index =
        prompt index * n + sample index. Leaving early cancels what is left."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or self.default_params
        params.check()
        ids = [self.encode(p, chat) for p in prompts]
        if not ids:
            raise DsflowError("empty prompt: give at least one token of text")
        for p in ids:
            self._check_prompt(p, params)
        handles: list[RequestHandle] = []
        items: queue.Queue = queue.Queue()
        try:
            for i, p in enumerate(ids):
                handles.append(self.submit(p, params))
                handles[-1].subscribe(lambda item, i=i: items.put((i, item)))
            left = len(ids) * params.n
            while left:
                i, item = items.get()
                if isinstance(item, BaseException):
                    raise item
                index = i * params.n + item.index
                done = item.finished
                if done is not None:
                    left -= 1
                    done = dataclasses.replace(done, index=index)
                yield dataclasses.replace(item, index=index, finished=done)
        finally:
            for h in handles:
                h.cancel()

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: Optional[SamplingParams] = None, chat: bool = False
                 ) -> list[Completion]:
        """Every completion of every prompt, in prompt order."""
        done = [e.finished for e in self.stream(prompts, params, chat) if e.finished]
        return sorted(done, key=lambda c: c.index)

    # ---- exclusive work on the engine thread ------------------------------------------
    def _call(self, slots: int, fn: Callable[[list[int]], object]) -> object:
        """Run fn(slot ids) on the engine thread between steps, with `slots` slots."""
        if slots > self.plan.slots:
            raise CacheLimitError(f"{slots} sequences at once exceed the {self.plan.slots} "
                                  "slots of this engine (--max-batch)")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self.scheduler.add_job(slots, fn, future)
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
        return self._call(len(ids), lambda slots: self.scheduler.forced_logits(
            slots, ids, [list(map(int, f)) for f in forced], chunk))
