"""The scheduler as pure policy: plans and updates, no process, no model."""
from __future__ import annotations

from dsflow.runtime.scheduler import CANCELLED, LENGTH, STOP, Request, Scheduler, StepPlan
from dsflow.runtime.slot_plan import SlotPlan

EOS = 99


def plan(slots=3, chunk=8, step_tokens=64) -> SlotPlan:
    return SlotPlan(slots, 128, chunk, 1024, step_tokens=step_tokens)


def request(rid: str, prompt, n=1, max_new=4) -> Request:
    return Request(rid, list(prompt), n, max_new, frozenset({EOS}))


def run(s: Scheduler, tokens=lambda step, i: 7) -> list[StepPlan]:
    """Step until idle, sampling `tokens(step, i)`; the plans it ran."""
    plans = []
    while s.has_work():
        p = s.schedule()
        plans.append(p)
        s.update(p, [tokens(len(plans), i) for i in range(len(p.sampled()))])
        assert len(plans) < 200
    return plans


def test_prompt_is_prefilled_in_chunks_then_decoded_to_max_tokens():
    s = Scheduler(plan(chunk=8))
    r = request("a", range(1, 21), max_new=3)
    s.add(r)
    plans = run(s)
    assert [[len(row.tokens) for row in p.prefill] for p in plans[:3]] == [[8], [8], [4]]
    assert [row.start for p in plans[:3] for row in p.prefill] == [0, 8, 16]
    assert plans[2].prefill[0].samples == r.seqs  # the last chunk samples the first token
    assert [len(p.decode) for p in plans] == [0, 0, 0, 1, 1]
    assert r.seqs[0].finish == LENGTH and r.seqs[0].generated == 3
    assert s.free == [0, 1, 2] and not s.active


def test_stop_token_ends_a_sequence_and_frees_its_slot():
    s = Scheduler(plan())
    r = request("a", [1, 2, 3], max_new=10)
    s.add(r)
    p = s.schedule()
    [u] = s.update(p, [5])
    assert u.finish is None and r.seqs[0].pending == 5
    p = s.schedule()
    [u] = s.update(p, [EOS])
    assert (u.finish, u.stop_token) == (STOP, True) and s.free == [0, 1, 2]


def test_n_samples_share_one_prefill_and_copy_its_slot():
    s = Scheduler(plan())
    r = request("a", range(1, 6), n=3)
    s.add(r)
    p = s.schedule()
    assert len(p.prefill) == 1 and len(p.prefill[0].samples) == 3
    assert len(p.copies) == 1 and p.copies[0].length == 5
    assert sorted([p.copies[0].src, *p.copies[0].dst]) == [0, 1, 2]


def test_without_copy_slot_each_sample_is_prefilled():
    s = Scheduler(plan(), copy_slot=False)
    s.add(request("a", range(1, 6), n=2))
    p = s.schedule()
    assert len(p.prefill) == 2 and not p.copies
    assert [len(row.samples) for row in p.prefill] == [1, 1]


def test_requests_wait_for_slots_fifo():
    s = Scheduler(plan(slots=2))
    a, b, c = request("a", [1, 2], n=2), request("b", [3]), request("c", [4])
    for r in (a, b, c):
        s.add(r)
    p = s.schedule()
    assert p.admitted == [a] and s.waiting_count() == 2
    run(s)
    assert all(r.done for r in (a, b, c))


def test_step_budget_bounds_prefill_while_decoding():
    s = Scheduler(plan(slots=3, chunk=256, step_tokens=32))
    s.add(request("busy", [1, 2], max_new=50))
    s.update(s.schedule(), [7])  # busy now decodes
    s.add(request("long", range(1, 101)))
    chunks = []
    for _ in range(10):
        p = s.schedule()
        chunks.append(sum(len(row.tokens) for row in p.prefill))
        s.update(p, [7] * len(p.sampled()))
    budget = s.plan.prefill_budget(1)
    assert max(chunks) <= budget < 100 and sum(chunks) == 100


def test_cancel_frees_at_the_next_schedule():
    s = Scheduler(plan(slots=1))
    a, b = request("a", [1, 2], max_new=100), request("b", [3])
    s.add(a)
    s.add(b)
    s.update(s.schedule(), [7])
    s.abort("a")
    p = s.schedule()
    assert p.finished == [(a, a.seqs[0])] and a.seqs[0].finish == CANCELLED
    assert p.admitted == [b]


def test_prefix_reuse_takes_the_slot_with_the_longest_common_prefix():
    s = Scheduler(plan(slots=3, chunk=64))
    first = request("a", range(1, 41), max_new=2)
    s.add(first)
    run(s)
    # the slot keeps the prompt and the first generated token it fed
    slot = next(i for i, c in enumerate(s.cached) if c)
    assert s.cached[slot] == list(range(1, 41)) + [7]
    again = request("b", list(range(1, 31)) + [500, 501], max_new=2)
    s.add(again)
    p = s.schedule()
    assert p.prefill[0].slot == slot and p.prefill[0].start == 30
    assert p.prefill[0].tokens == [500, 501] and s.reused_tokens == 30
    run(s)  # b overwrote the slot after the 30 shared tokens
    s.add(request("c", range(1, 41), max_new=2))
    p = s.schedule()
    assert p.prefill[0].slot == slot and p.prefill[0].start == 30
    run(s)
    s.add(request("d", range(1, 41), max_new=2))  # all cached: the last token is fed
    p = s.schedule()
    assert p.prefill[0].start == 39 and p.prefill[0].tokens == [40]


def test_no_prefix_reuse_prefills_everything():
    s = Scheduler(plan(chunk=64), prefix_reuse=False)
    s.add(request("a", range(1, 11), max_new=1))
    run(s)
    s.add(request("b", range(1, 11), max_new=1))
    p = s.schedule()
    assert p.prefill[0].start == 0 and s.reused_tokens == 0


def test_prefix_reuse_with_samples_prefilled_each():
    s = Scheduler(plan(slots=4, chunk=64), copy_slot=False)
    s.add(request("a", range(1, 11), n=2, max_new=1))
    run(s)
    s.add(request("b", range(1, 13), n=2, max_new=1))
    p = s.schedule()
    assert {row.start for row in p.prefill} == {10}  # both slots held the prompt


def test_exclusive_slots_lose_their_cache():
    s = Scheduler(plan(slots=1, chunk=64))
    s.add(request("a", range(1, 11), max_new=1))
    run(s)
    slots = s.reserve(1)
    s.release(slots)
    s.add(request("b", range(1, 11), max_new=1))
    assert s.schedule().prefill[0].start == 0


def test_dropped_requests_forget_their_slots_cache():
    s = Scheduler(plan(slots=1, chunk=64))
    r = request("a", range(1, 11), max_new=5)
    s.add(r)
    p = s.schedule()
    s.drop([r])
    assert s.free == [0] and s.cached[0] == [] and r.done
    assert p.prefill  # the plan that failed


def test_the_probe_writes_past_the_cached_tokens():
    s = Scheduler(plan(slots=2, chunk=64))
    s.add(request("a", range(1, 11), max_new=1))
    run(s)
    slot, position = s.reserve_probe()
    assert s.cached[slot] == [] and position == 0  # the emptier slot
    s.release([slot], keep_cache=True)
    s.add(request("b", range(1, 11), max_new=1))
    assert s.schedule().prefill[0].start == 9  # the cached prompt survived
