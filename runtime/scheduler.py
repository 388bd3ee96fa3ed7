"""Iteration-level scheduling (as in Orca and vLLM) over the workers' slot caches: pure
policy. `schedule()` says what the next step runs (`StepPlan`); `update(plan, output)`
applies the tokens it produced. No I/O, no sampling, no text: the engine core
(runtime/engine_core.py) runs the plan on the executor and hands the tokens to the
output processor, so this class is unit-tested without a process.

Each step:
1. cancelled sequences leave (their slots are free at once);
2. waiting requests are admitted in FIFO order while slots are free (a request of n
   samples needs n slots); with scheduling="static" only when nothing runs, the old
   one-batch-at-a-time behaviour, kept for comparison. With prefix reuse a request
   takes the free slot whose cached tokens share the longest prefix with its prompt
   (llama.cpp's server slots) and prefills only the rest;
3. the decode rows: every sequence with a sampled token not yet fed;
4. the prefill rows: the next chunk of the admitted prompts, oldest first: at most
   `prefill_chunk` prompt tokens when nothing decodes; while sequences decode, what
   the step-token budget leaves after them (`SlotPlan.prefill_budget`). A prompt whose
   last chunk runs gets its first token(s) sampled from that row; its n samples copy
   its slot after the prefill (`copies`), or, where the backend cannot copy slots
   (Lite, device-resident cache), each sample's slot is prefilled.
So a long prompt delays the running decodes by one bounded chunk per step, never by its
whole prefill, and a new request waits at most one step to start.

The step-token budget is Sarathi-Serve's stall-free batching (vLLM's
max_num_batched_tokens, decodes scheduled first): on a CPU a step costs roughly its
token count (docs/BENCHMARKS.md, "Serving").
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

from dsflow.runtime.slot_plan import SlotPlan

CANCELLED, STOP, LENGTH = "cancelled", "stop", "length"


@dataclass
class Sequence:
    """One completion being generated in one slot (the scheduler's view: tokens only)."""
    index: int
    slot: int = -1
    pending: Optional[int] = None  # sampled, K/V not yet in the slot
    filled: int = 0                # slot positions holding K/V
    generated: int = 0             # tokens sampled so far
    finish: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish is not None


@dataclass
class Request:
    """A prompt and its n sequences. `stop_ids`: token ids that end a sequence."""
    request_id: str
    prompt: list[int]
    n: int
    max_new_tokens: int
    stop_ids: frozenset = frozenset()
    seqs: list[Sequence] = field(default_factory=list)
    prefilled: int = 0   # prompt positions in the (first) prefilled slot
    reused: int = 0      # of those, taken from the slot's cache (prefix reuse)

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(i) for i in range(self.n)]

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)


@dataclass
class PrefillRow:
    """`tokens` written at `start..` of `slot`; if `samples` is not empty, the row ends its
    prompt and each listed sequence gets a first token sampled from its logits."""
    request: Request
    slot: int
    tokens: list[int]
    start: int
    samples: list[Sequence] = field(default_factory=list)


@dataclass
class DecodeRow:
    request: Request
    seq: Sequence

    @property
    def slot(self) -> int:
        return self.seq.slot


@dataclass
class Copy:
    """After the prefill: slot `src`'s first `length` positions into each of `dst`."""
    src: int
    dst: list[int]
    length: int


@dataclass
class StepPlan:
    prefill: list[PrefillRow] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    decode: list[DecodeRow] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    # sequences that ended without a step (cancelled), for the output processor
    finished: list[tuple[Request, Sequence]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)

    def sampled(self) -> list[tuple[Request, Sequence]]:
        """Every sequence this step samples a token for, in output order: prefill rows'
        samples first, then the decode rows."""
        out = [(row.request, s) for row in self.prefill for s in row.samples]
        return out + [(row.request, row.seq) for row in self.decode]


@dataclass
class Update:
    """One sampled token's effect on one sequence."""
    request: Request
    seq: Sequence
    token: int
    finish: Optional[str]   # set when this token ended the sequence
    stop_token: bool        # the token is a stop token (not part of the output)


class Scheduler:
    def __init__(self, plan: SlotPlan, static: bool = False, copy_slot: bool = True,
                 prefix_reuse: bool = True):
        """copy_slot: whether the executor can copy one slot's K/V into others (n samples
        sharing one prefill); prefix_reuse: admit into the free slot whose cache shares
        the longest prefix with the prompt, and prefill only the rest."""
        self.plan = plan
        self.static = static
        self.copy_slot = copy_slot
        self.prefix_reuse = prefix_reuse
        self.free: list[int] = list(range(plan.slots))
        # tokens whose K/V each slot holds at positions 0.. (valid whatever the slot's
        # state; a free slot keeps them for the next request that shares them)
        self.cached: list[list[int]] = [[] for _ in range(plan.slots)]
        self.last_used: list[int] = [0] * plan.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cancelled: set[tuple[str, int]] = set()
        self.steps = 0
        self.decode_steps = 0    # steps with decode rows (tests check steps are shared)
        self.reused_tokens = 0   # prompt tokens not prefilled thanks to prefix reuse

    # ---- requests in ----------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request_id: str, index: Optional[int] = None
              ) -> list[tuple[Request, Sequence]]:
        """Cancel one sequence (index) or all of a request. A waiting request leaves the
        queue at once (its ended sequences are returned); a running one at the next
        schedule (StepPlan.finished)."""
        for r in list(self.waiting):
            if r.request_id == request_id:
                ended = [s for s in r.seqs if index is None or s.index == index]
                for s in ended:
                    s.finish = CANCELLED
                if r.done:
                    self.waiting.remove(r)
                return [(r, s) for s in ended]
        for r in self.active:
            if r.request_id == request_id:
                for s in r.seqs:
                    if index is None or s.index == index:
                        self.cancelled.add((request_id, s.index))
        return []

    def waiting_count(self) -> int:
        return len(self.waiting)

    def running_count(self) -> int:
        return sum(1 for r in self.active for s in r.seqs if not s.done)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def drop_all(self) -> list[Request]:
        """Forget every request (the engine failed or closed); returns them."""
        reqs = list(self.waiting) + self.active
        for r in self.active:
            for s in r.seqs:
                self._release(s, keep_cache=False)
        self.waiting.clear()
        self.active = []
        self.cancelled.clear()
        return reqs

    def drop(self, requests: list[Request]) -> None:
        """Forget these requests after their step failed: their slots' K/V is unknown."""
        for r in requests:
            for s in r.seqs:
                if not s.done:
                    s.finish = CANCELLED
                self._release(s, keep_cache=False)
            if r in self.active:
                self.active.remove(r)
            if r in self.waiting:
                self.waiting.remove(r)

    # ---- slots for exclusive work (teacher forcing, the health probe) ---------------------
    def reserve(self, count: int) -> Optional[list[int]]:
        if len(self.free) < count:
            return None
        slots = self.free[:count]
        del self.free[:count]
        return slots

    def release(self, slots: list[int], keep_cache: bool = False) -> None:
        """Slots back from exclusive work: their K/V is whatever that work left, unless
        it wrote only past their cached tokens (the probe)."""
        for slot in slots:
            if not keep_cache:
                self.cached[slot] = []
        self.free = sorted(self.free + slots)

    def reserve_probe(self) -> Optional[tuple[int, int]]:
        """(slot, position) for a one-token probe step that keeps every cached prefix:
        the free slot holding the fewest tokens, written just past them."""
        if not self.free:
            return None
        slot = min(self.free, key=lambda s: (len(self.cached[s]), s))
        self.free.remove(slot)
        if len(self.cached[slot]) >= self.plan.capacity:
            del self.cached[slot][self.plan.capacity - 1:]
        return slot, len(self.cached[slot])

    # ---- the plan -----------------------------------------------------------------------
    def schedule(self, admit: bool = True) -> StepPlan:
        """The next step. admit=False: none of the waiting requests start (exclusive
        work waits for slots)."""
        plan = StepPlan()
        self._apply_cancels(plan)
        if admit:
            self._admit(plan)
        plan.decode = [DecodeRow(r, s) for r in self.active for s in r.seqs
                       if s.pending is not None and not s.done]
        self._plan_prefill(plan)
        if not plan.empty:
            self.steps += 1
            self.decode_steps += bool(plan.decode)
        return plan

    def _apply_cancels(self, plan: StepPlan) -> None:
        if not self.cancelled:
            return
        for r in list(self.active):
            for s in r.seqs:
                if (r.request_id, s.index) in self.cancelled and not s.done:
                    s.finish = CANCELLED
                    plan.finished.append((r, s))
                    if not (r.prefilling and s.index == 0):
                        self._release(s)
            self._retire_if_done(r)
        self.cancelled.clear()

    def _admit(self, plan: StepPlan) -> None:
        if self.static and self.active:
            return
        while self.waiting and len(self.free) >= len(self.waiting[0].seqs):
            r = self.waiting.popleft()
            self._place(r)
            self.active.append(r)
            plan.admitted.append(r)

    def _place(self, r: Request) -> None:
        """Slots for a request's sequences; the prefilled ones by longest cached prefix."""
        prefilled = r.seqs[:1] if self.copy_slot else r.seqs
        reuse = None
        for s in r.seqs:
            s.slot, common = self._best_slot(r.prompt if s in prefilled else [])
            if s in prefilled:
                reuse = common if reuse is None else min(reuse, common)
        # at least one prompt token is fed: its logits give the first token
        r.reused = r.prefilled = min(reuse or 0, len(r.prompt) - 1)
        self.reused_tokens += r.reused

    def _best_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, common prefix length): the longest common prefix with the prompt; else
        (and without prefix reuse) the least recently used free slot, so that recent
        caches stay for the requests most likely to share them."""
        best, common = None, 0
        if self.prefix_reuse and prompt:
            for slot in self.free:
                n = _common_prefix(self.cached[slot], prompt)
                if n > common:
                    best, common = slot, n
        if best is None:
            best = (min(self.free, key=lambda s: (self.last_used[s], s)) if self.prefix_reuse
                    else self.free[0])
        self.free.remove(best)
        self.last_used[best] = self.steps + 1
        return best, common

    def _plan_prefill(self, plan: StepPlan) -> None:
        budget = self.plan.prefill_budget(len(plan.decode))
        for r in self.active:
            if not r.prefilling or budget <= 0:
                continue
            take = min(len(r.prompt) - r.prefilled, budget)
            budget -= take
            chunk = r.prompt[r.prefilled:r.prefilled + take]
            last = r.prefilled + take == len(r.prompt)
            live = [s for s in r.seqs if not s.done]
            if self.copy_slot:
                rows = [PrefillRow(r, r.seqs[0].slot, chunk, r.prefilled,
                                   live if last else [])]
                others = [s.slot for s in r.seqs[1:] if not s.done]
                if last and others:
                    plan.copies.append(Copy(r.seqs[0].slot, others, len(r.prompt)))
            else:
                rows = [PrefillRow(r, s.slot, chunk, r.prefilled, [s] if last else [])
                        for s in live]
            plan.prefill += rows

    # ---- the step's tokens --------------------------------------------------------------
    def update(self, plan: StepPlan, tokens: list[int]) -> list[Update]:
        """Apply a step's sampled tokens (one per `plan.sampled()`, in that order): the
        slots' contents, the sequences' stop conditions (stop token ids, max new tokens:
        stop strings are the output processor's, which aborts the sequence)."""
        for row in plan.prefill:
            self._write(row.slot, row.start, row.tokens)
            row.request.prefilled = row.start + len(row.tokens)
        for c in plan.copies:
            for d in c.dst:
                self.cached[d] = self.cached[c.src][:c.length]
        for row in plan.decode:
            self._write(row.slot, row.seq.filled, [row.seq.pending])
            row.seq.filled += 1
        updates = []
        for (r, s), token in zip(plan.sampled(), tokens):
            if s.done:  # cancelled while the step ran
                continue
            if s.generated == 0:
                s.filled = len(r.prompt)
            s.generated += 1
            stop = token in r.stop_ids
            finish = STOP if stop else (LENGTH if s.generated >= r.max_new_tokens else None)
            s.pending = None if finish else token
            if finish:
                s.finish = finish
                self._release(s)
            updates.append(Update(r, s, token, finish, stop))
        for r in {id(r): r for r, _ in plan.sampled()}.values():
            self._retire_if_done(r)
        return updates

    def _write(self, slot: int, start: int, tokens: list[int]) -> None:
        cache = self.cached[slot]
        del cache[start:]
        cache.extend(tokens)

    def _release(self, s: Sequence, keep_cache: bool = True) -> None:
        if s.slot >= 0:
            if not keep_cache:
                self.cached[s.slot] = []
            self.free.append(s.slot)
            self.free.sort()
            s.slot = -1
        s.pending = None

    def _retire_if_done(self, r: Request) -> None:
        if r.done and r in self.active:
            self.active.remove(r)
            for s in r.seqs:  # a prompt's first slot, kept while it was being prefilled
                self._release(s)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
