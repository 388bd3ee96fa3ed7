"""Iteration-level scheduling (as in Orca and vLLM) over the workers' slot caches.

One engine thread runs `Scheduler.run`; it alone talks to the cluster. Each iteration:
1. cancelled requests leave (their slots are free at once);
2. an exclusive job (forced_logits) runs if one waits and its slots are free;
3. waiting requests are admitted in FIFO order while slots are free (a request of n
   samples needs n slots); with scheduling="static" only when nothing runs, which is
   the old one-batch-at-a-time behaviour, kept for comparison;
4. one prefill step: the next chunk of the admitted prompts, oldest first: at most
   `prefill_chunk` prompt tokens in all when nothing decodes; while sequences decode,
   what the step-token budget leaves after them (`SlotPlan.prefill_budget`); a prompt
   whose last chunk ran gets its first token sampled (its n samples copy its slot
   first) and joins the decode batch;
5. one decode step for every sequence with a token to feed; finished sequences leave
   in the same step.
So a long prompt delays the running decodes by one bounded chunk per step, never by its
whole prefill, and a new request waits at most one step to start.

The step-token budget is Sarathi-Serve's stall-free batching (vLLM's
max_num_batched_tokens, decodes scheduled first): on a CPU a step costs roughly its
token count, so a 256-token chunk landing among running decodes made that step's
inter-token gap 8x a decode step's (docs/BENCHMARKS.md, "Serving"). With the budget
the prefill work is spread over many steps: every gap grows a little instead of a few
growing a lot, and the idle engine still prefills whole chunks for a fast first token.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from dsflow.artifacts.manifest import Manifest
from dsflow.common.errors import DsflowError
from dsflow.graphs.signatures import RESIDENT
from dsflow.runtime.cluster import Cluster
from dsflow.runtime.requests import Completion, RequestHandle, StreamEvent, _SequenceState
from dsflow.runtime.sampling import Sampler, SamplingParams
from dsflow.runtime.slot_cache import KV_ALIGN, SEQ_ALIGN, CacheLimitError, gear

log = logging.getLogger("dsflow.scheduler")

DEFAULT_MAX_BATCH = 8
# Without --max-batch / --cache-mb the slots are capped by this budget per rank (at
# least one slot): 8 x 16K tokens of a 1.3B fp32 model would be 51 GiB of address space.
DEFAULT_CACHE_MB = 4096
DEFAULT_PREFILL_CHUNK = 256
# Tokens per step (decodes + prefill) while sequences decode; see prefill_budget.
DEFAULT_STEP_TOKENS = 64


@dataclass(frozen=True)
class SlotPlan:
    """How many sequences the cache holds (slots), how long each may grow (capacity),
    and the prompt tokens per prefill step."""
    slots: int
    capacity: int
    prefill_chunk: int
    bytes_per_token: int  # per rank, keys and values
    buckets: Optional[tuple[int, ...]] = None
    step_tokens: int = DEFAULT_STEP_TOKENS
    copies: int = 1  # 2 for a resident cache: the graphs' input and output pairs

    @property
    def cache_bytes(self) -> int:
        return self.copies * self.slots * self.capacity * self.bytes_per_token

    def describe(self) -> str:
        copies = " (two copies: resident ping-pong)" if self.copies == 2 else ""
        return (f"KV cache: {self.slots} sequences x {self.capacity} tokens = "
                f"{self.cache_bytes / 2**20:.0f} MiB per rank{copies}; prefill chunk "
                f"{self.prefill_chunk} tokens, {self.step_tokens} tokens per step while "
                "decoding")

    def prefill_budget(self, decoding: int) -> int:
        """Prompt tokens one step may prefill while `decoding` sequences decode: the
        whole chunk when none do; else what the step budget leaves after the decodes,
        in whole SEQ_ALIGN units (a chunk is padded to one anyway), and at least one
        unit so that prompts always progress. With shape buckets (Ascend) the chunk is
        the prefill graphs' one seq gear, so the budget does not apply."""
        if decoding == 0 or self.buckets:
            return self.prefill_chunk
        left = (self.step_tokens - decoding) // SEQ_ALIGN * SEQ_ALIGN
        return min(self.prefill_chunk, max(SEQ_ALIGN, left))

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        need = prompt_len + params.max_new_tokens
        if need > self.capacity:
            raise CacheLimitError(
                f"prompt ({prompt_len} tokens) + max new tokens ({params.max_new_tokens}) = "
                f"{need} exceeds the maximum sequence length of this engine "
                f"({self.capacity}); shorten the prompt, lower --max-new-tokens, or raise "
                "--max-seq-len (up to the artifacts' limit)")
        if params.n > self.slots:
            raise CacheLimitError(f"n = {params.n} samples exceed the {self.slots} sequences "
                                  "the cache holds (--max-batch / --cache-mb)")

    def window(self, longest: int) -> int:
        """kv_len of a step whose rows hold at most `longest` positions."""
        return min(gear(longest, self.buckets, KV_ALIGN), self.capacity)

    def chunk_len(self, longest: int) -> int:
        return gear(longest, self.buckets, SEQ_ALIGN)


def plan_slots(manifest: Manifest, max_batch: Optional[int] = None,
               max_seq_len: Optional[int] = None, cache_mb: Optional[float] = None,
               prefill_chunk: Optional[int] = None,
               max_step_tokens: Optional[int] = None) -> SlotPlan:
    """Slots and capacity from the options: capacity = --max-seq-len (default and limit:
    the artifacts' max_seq_len); slots = --max-batch, or as many as --cache-mb holds
    (both: the smaller), default 8 within DEFAULT_CACHE_MB. With shape buckets (Ascend)
    the capacity is rounded up to a bucket, slots are capped by the largest batch gear
    and chunks by the smallest bucket (export/pipeline/lite_build.py gears). A resident
    cache counts twice (input and output pairs); one built for GE has its slots and
    capacity fixed (`_pinned_plan`)."""
    if manifest.resident_shape:
        return _pinned_plan(manifest, max_batch, max_seq_len, cache_mb, prefill_chunk,
                            max_step_tokens)
    copies = 2 if manifest.cache_mode == RESIDENT else 1
    limit = manifest.max_seq_len
    capacity = max_seq_len or limit
    if not 2 <= capacity <= limit:
        raise DsflowError(f"--max-seq-len {capacity}: must be in 2..{limit} (the artifacts' "
                          "max_seq_len; rebuild with a larger --max-seq-len)")
    buckets = tuple(manifest.buckets) if manifest.buckets else None
    if buckets:
        capacity = gear(capacity, buckets, 1, "--max-seq-len")
    per_token = manifest.kv_bytes_per_token * copies  # per slot position, all copies
    if max_batch is not None and max_batch < 1:
        raise DsflowError(f"--max-batch {max_batch}: must be >= 1")
    slots = max_batch or DEFAULT_MAX_BATCH
    if max_batch is None and cache_mb is None:
        slots = max(1, min(slots, DEFAULT_CACHE_MB * 2**20 // (capacity * per_token)))
    if cache_mb is not None:
        fit = int(cache_mb * 2**20 // (capacity * per_token))
        if fit < 1:
            raise DsflowError(f"--cache-mb {cache_mb}: too small for one sequence of "
                              f"{capacity} tokens ({capacity * per_token / 2**20:.1f} MiB "
                              "per rank); raise it or lower --max-seq-len")
        slots = min(max_batch, fit) if max_batch else fit
    gears = manifest.lite.get("batch_sizes")
    if gears:
        slots = min(slots, max(gears))
    return SlotPlan(slots, capacity, _chunk(prefill_chunk, buckets), manifest.kv_bytes_per_token,
                    buckets, _step(max_step_tokens), copies)


def _chunk(prefill_chunk: Optional[int], buckets: Optional[tuple[int, ...]]) -> int:
    chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
    if chunk < 1:
        raise DsflowError(f"--prefill-chunk {chunk}: must be >= 1")
    if buckets:  # the prefill graphs have one chunk gear: the smallest bucket
        chunk = min(chunk, buckets[0])
    return chunk


def _pinned_plan(manifest: Manifest, max_batch: Optional[int], max_seq_len: Optional[int],
                 cache_mb: Optional[float], prefill_chunk: Optional[int],
                 max_step_tokens: Optional[int]) -> SlotPlan:
    """A resident cache built for GE has its slots and capacity fixed in the graphs
    (export/pipeline/lite_build.py resident_dims): options may restate them, not change
    them, and --cache-mb may only refuse them."""
    slots, capacity = manifest.resident_shape
    fixed = "(dsexport build --batch-sizes / --buckets); rebuild to change it"
    for option, value, built in (("--max-batch", max_batch, slots),
                                 ("--max-seq-len", max_seq_len, capacity)):
        if value is not None and value != built:
            raise DsflowError(f"{option} {value}: these artifacts keep the KV cache on the "
                              f"device as {slots} slots x {capacity} positions, fixed at "
                              f"build {fixed}")
    buckets = tuple(manifest.buckets) if manifest.buckets else None
    plan = SlotPlan(slots, capacity, _chunk(prefill_chunk, buckets),
                    manifest.kv_bytes_per_token, buckets, _step(max_step_tokens), copies=2)
    if cache_mb is not None and plan.cache_bytes > cache_mb * 2**20:
        raise DsflowError(f"--cache-mb {cache_mb}: the device-resident cache of these "
                          f"artifacts needs {plan.cache_bytes / 2**20:.0f} MiB per rank "
                          f"({slots} slots x {capacity} positions, two copies) {fixed}")
    return plan


def _step(max_step_tokens: Optional[int]) -> int:
    step = DEFAULT_STEP_TOKENS if max_step_tokens is None else max_step_tokens
    if step < 1:
        raise DsflowError(f"--max-step-tokens {step}: must be >= 1")
    return step


@dataclass
class _Sequence:
    """One completion being generated in one slot."""
    state: _SequenceState
    sampler: Sampler
    slot: int = -1
    pending: Optional[int] = None  # sampled, K/V not yet in the slot
    filled: int = 0                # slot positions holding K/V
    decode_steps: int = 0
    t_first: float = 0.0


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    seqs: list[_Sequence]
    t_submit: float
    t_admit: float = 0.0
    prefilled: int = 0  # prompt tokens in the first sequence's slot

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)


@dataclass
class _Job:
    slots: int
    fn: Callable[[list[int]], object]
    future: concurrent.futures.Future


class Scheduler:
    def __init__(self, cluster: Cluster, plan: SlotPlan, tokenizer, manifest: Manifest,
                 scheduling: str, cond: threading.Condition, copy_slot: bool = True):
        """copy_slot: whether the workers can copy one slot's K/V into others (n samples
        sharing one prefill); a backend whose cache only its graphs can write (Lite,
        device-resident) says no, and each sample's slot is prefilled instead."""
        self.cluster, self.plan, self.tokenizer = cluster, plan, tokenizer
        self.copy_slot = copy_slot
        self.static = scheduling == "static"
        self.cond = cond
        cfg = manifest.config
        self.vocab = cfg.vocab_size
        self.vocab_limit = min(tokenizer.vocab_size, cfg.vocab_size)
        # filler for padded prompt positions: any valid row will do
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id < cfg.vocab_size else 0
        self.free = list(range(plan.slots))
        self.waiting: collections.deque[_Request] = collections.deque()
        self.jobs: collections.deque[_Job] = collections.deque()
        self.active: list[_Request] = []
        self.closing = False
        self.decode_steps = 0  # batched decode calls so far (tests check steps are shared)

    # ---- called from any thread, under cond --------------------------------------------
    def add(self, handle: RequestHandle, params: SamplingParams) -> None:
        seqs = [_Sequence(_SequenceState(Completion(i, list(handle.prompt_token_ids)),
                                         self.tokenizer, params),
                          Sampler(params, self.vocab_limit, i)) for i in range(params.n)]
        self.waiting.append(_Request(handle, handle.prompt_token_ids, params, seqs,
                                     time.perf_counter()))

    def add_job(self, slots: int, fn, future) -> None:
        self.jobs.append(_Job(slots, fn, future))

    def waiting_count(self) -> int:
        return len(self.waiting)

    def running_count(self) -> int:
        return sum(len(r.seqs) for r in self.active)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    def fail_all(self, error: BaseException) -> None:
        """End every request and job with `error` (a dead rank, or the engine closing)."""
        with self.cond:
            reqs = list(self.waiting) + self.active
            jobs = list(self.jobs)
            self.waiting.clear()
            self.jobs.clear()
            self.active = []
            self.closing = True
        for r in reqs:
            r.handle._push(error)
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(error)

    # ---- the engine thread -----------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.cond:
                while not (self.closing or self.waiting or self.active or self.jobs):
                    self.cond.wait()
                if self.closing:
                    return
                self._drop_cancelled_waiting()
                job = self.jobs[0] if self.jobs and len(self.free) >= self.jobs[0].slots \
                    else None
                if job is not None:
                    self.jobs.popleft()
                elif not self.jobs:
                    self._admit()
            self._retire_cancelled()
            if job is not None:
                self._run_job(job)
            self._prefill_step()
            self._decode_step()

    def _drop_cancelled_waiting(self) -> None:
        for r in [r for r in self.waiting if r.handle.cancelled]:
            self.waiting.remove(r)
            self._cancel(r)

    def _admit(self) -> None:
        if self.static and self.active:
            return
        while self.waiting and len(self.free) >= len(self.waiting[0].seqs):
            r = self.waiting.popleft()
            for s in r.seqs:
                s.slot = self.free.pop(0)
            r.t_admit = time.perf_counter()
            self.active.append(r)

    def _retire_cancelled(self) -> None:
        for r in [r for r in self.active if r.handle.cancelled]:
            self._cancel(r)

    def _cancel(self, r: _Request) -> None:
        for s in r.seqs:
            if not s.state.done:
                text = s.state.cancel()
                self._finish(r, s)
                r.handle._push(StreamEvent(s.state.c.index, text, [], None, s.state.c))

    def _finish(self, r: _Request, s: _Sequence) -> None:
        """A sequence is done: timings, free its slot, and drop the request when all are."""
        c = s.state.c
        now = time.perf_counter()
        if s.t_first:
            c.decode_ms_per_token = (now - s.t_first) * 1e3 / max(s.decode_steps, 1)
        if s.slot >= 0:
            self.free.append(s.slot)
            self.free.sort()
            s.slot = -1
        s.pending = None
        if all(q.state.done for q in r.seqs) and r in self.active:
            self.active.remove(r)

    def _run_job(self, job: _Job) -> None:
        slots = [self.free.pop(0) for _ in range(job.slots)]
        try:
            job.future.set_result(job.fn(slots))
        except BaseException as e:
            job.future.set_exception(e)
            if self.cluster.failed or not isinstance(e, DsflowError):
                raise  # the engine fails too
        finally:
            self.free = sorted(self.free + slots)

    # ---- steps ---------------------------------------------------------------------------
    def _gather(self, op: str, payload: dict) -> np.ndarray:
        return np.concatenate(self.cluster.request(op, payload), axis=1)

    def run_prefill(self, rows: list[tuple[int, list[int], int]]) -> np.ndarray:
        """rows of (slot, chunk tokens, start position) -> last-token logits [rows, V]."""
        seq = self.plan.chunk_len(max(len(t) for _, t, _ in rows))
        ids = np.full((len(rows), seq), self.pad_id, np.int32)
        for b, (_, tokens, _) in enumerate(rows):
            ids[b, :len(tokens)] = tokens
        start = np.array([s for _, _, s in rows], np.int32)
        return self._gather("prefill", {
            "slot_ids": np.array([slot for slot, _, _ in rows], np.int32), "input_ids": ids,
            "start": start, "valid_length": np.array([len(t) for _, t, _ in rows], np.int32),
            "kv_len": self.plan.window(int(start.max()))})

    def run_decode(self, slots: list[int], tokens: list[int], positions: list[int]
                   ) -> np.ndarray:
        return self._gather("decode", {
            "slot_ids": np.array(slots, np.int32), "input_ids": np.array(tokens, np.int32),
            "positions": np.array(positions, np.int32),
            # > every position: the Ascend kernels write the new token into the window
            "kv_len": self.plan.window(max(positions) + 1)})

    def _prefill_step(self) -> None:
        rows, budget = [], self.plan.prefill_budget(len(self._decoding()))
        for r in self.active:
            if not r.prefilling:
                continue
            if budget <= 0:
                break
            take = min(len(r.prompt) - r.prefilled, budget)
            rows.append((r, take))
            budget -= take
        if not rows:
            return
        batch, first_row = [], []
        for r, take in rows:
            first_row.append(len(batch))
            chunk = r.prompt[r.prefilled:r.prefilled + take]
            batch += [(s.slot, chunk, r.prefilled) for s in self._prefill_seqs(r)]
        logits = self.run_prefill(batch)
        for (r, take), i in zip(rows, first_row):
            r.prefilled += take
            if not r.prefilling:
                self._first_tokens(r, logits[i])

    def _prefill_seqs(self, r: _Request) -> list[_Sequence]:
        """The sequences whose slots a prompt chunk is written into: the first (the
        others copy its slot at the end), or every sample without copy_slot."""
        return r.seqs[:1] if self.copy_slot else r.seqs

    def _first_tokens(self, r: _Request, row: np.ndarray) -> None:
        if len(r.seqs) > 1 and self.copy_slot:  # the other samples share the prompt's K/V
            self.cluster.request("copy_slot", {"src": r.seqs[0].slot, "length": len(r.prompt),
                                               "dst": [s.slot for s in r.seqs[1:]]})
        now = time.perf_counter()
        for s in r.seqs:
            s.filled, s.t_first = len(r.prompt), now
            s.state.c.prefill_ms = (now - r.t_admit) * 1e3
            s.state.c.time_to_first_token_ms = (now - r.t_submit) * 1e3
            self._emit(r, s, *s.sampler.pick(row))

    def _decoding(self) -> list[tuple[_Request, _Sequence]]:
        """The sequences with a sampled token to feed: this step's decode batch."""
        return [(r, s) for r in self.active for s in r.seqs if s.pending is not None]

    def _decode_step(self) -> None:
        live = self._decoding()
        if not live:
            return
        logits = self.run_decode([s.slot for _, s in live], [s.pending for _, s in live],
                                 [s.filled for _, s in live])
        self.decode_steps += 1
        for (r, s), row in zip(live, logits):
            s.filled += 1
            s.decode_steps += 1
            self._emit(r, s, *s.sampler.pick(row))

    def _emit(self, r: _Request, s: _Sequence, token: int, logprob) -> None:
        text = s.state.add(token, logprob)
        done = s.state.done
        s.pending = None if done else token
        if done:
            self._finish(r, s)
        r.handle._push(StreamEvent(s.state.c.index, text, [token],
                                   None if logprob is None else [logprob],
                                   s.state.c if done else None))

    # ---- teacher forcing (parity tests, scoring) ---------------------------------------------
    def forced_logits(self, slots: list[int], prompts: list[list[int]],
                      forced: list[list[int]], chunk: int) -> np.ndarray:
        done = [0] * len(prompts)
        first: list[Optional[np.ndarray]] = [None] * len(prompts)
        while any(d < len(p) for d, p in zip(done, prompts)):
            todo = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            logits = self.run_prefill([(slots[i], prompts[i][done[i]:done[i] + chunk], done[i])
                                       for i in todo])
            for i, row in zip(todo, logits):
                done[i] = min(done[i] + chunk, len(prompts[i]))
                if done[i] == len(prompts[i]):
                    first[i] = row[:self.vocab]
        out = [np.stack(first)]
        for step in range(len(forced[0]) if forced else 0):
            out.append(self.run_decode(slots, [f[step] for f in forced],
                                       [len(p) + step for p in prompts])[:, :self.vocab])
        return np.stack(out, axis=1)
