"""Slot planning and the slot cache itself (no workers needed)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dsflow.common.errors import DsflowError
from dsflow.runtime.sampling import SamplingParams
from dsflow.runtime.slot_plan import DEFAULT_CACHE_MB, plan_slots
from dsflow.runtime.slot_cache import CacheLimitError, SlotCache, batch_gears, gear


def manifest(max_seq_len=4096, per_token=1024, buckets=None, lite=None, cache_mode="window",
             resident_shape=None):
    return SimpleNamespace(max_seq_len=max_seq_len, buckets=buckets,
                           kv_bytes_per_token=per_token, lite=lite or {},
                           cache_mode=cache_mode, resident_shape=resident_shape)


def test_slots_from_options():
    assert plan_slots(manifest()).slots == 8
    assert plan_slots(manifest(), max_batch=3).slots == 3
    # 64 MiB of 1 KiB tokens at 4096 per sequence: 16 sequences
    assert plan_slots(manifest(), cache_mb=64).slots == 16
    assert plan_slots(manifest(), max_batch=5, cache_mb=64).slots == 5
    assert plan_slots(manifest(), max_seq_len=1024, cache_mb=64).slots == 64
    big = manifest(max_seq_len=16384, per_token=393216)  # 1.3B fp32: 6 GiB per sequence
    assert plan_slots(big).slots == 1 and DEFAULT_CACHE_MB < 6144
    with pytest.raises(DsflowError, match="--cache-mb 1: too small"):
        plan_slots(manifest(), cache_mb=1)
    with pytest.raises(DsflowError, match="--max-seq-len 5000: must be in 2..4096"):
        plan_slots(manifest(), max_seq_len=5000)
    assert "8 sequences x 4096 tokens = 32 MiB per rank" in plan_slots(manifest()).describe()


def test_buckets_round_capacity_cap_slots_and_chunks():
    plan = plan_slots(manifest(buckets=[512, 1024, 4096], lite={"batch_sizes": [1, 2, 4]}),
                      max_seq_len=600, max_batch=8)
    assert (plan.capacity, plan.slots, plan.prefill_chunk) == (1024, 4, 256)
    assert plan.window(0) == 512 and plan.window(513) == 1024 and plan.chunk_len(3) == 512
    assert plan_slots(manifest(buckets=[128, 4096]), prefill_chunk=300).prefill_chunk == 128


def test_resident_cache_counts_two_copies_and_a_built_shape_is_pinned():
    cpu = plan_slots(manifest(cache_mode="resident"), cache_mb=64)  # any shape, 2 copies
    assert (cpu.slots, cpu.copies, cpu.cache_bytes) == (8, 2, 64 * 2**20)
    assert "two copies" in cpu.describe()
    built = manifest(buckets=[512, 4096], lite={"batch_sizes": [1, 4]},
                     cache_mode="resident", resident_shape=(4, 4096))
    plan = plan_slots(built, max_seq_len=4096, prefill_chunk=1000)  # restating is fine
    assert (plan.slots, plan.capacity, plan.prefill_chunk, plan.copies) == (4, 4096, 512, 2)
    for option, value in (("max_batch", 8), ("max_seq_len", 1024)):
        with pytest.raises(DsflowError, match="4 slots x 4096 positions, fixed at build"):
            plan_slots(built, **{option: value})
    with pytest.raises(DsflowError, match="--cache-mb 16: the device-resident cache of "
                                          "these artifacts needs 32 MiB"):
        plan_slots(built, cache_mb=16)


def test_step_budget_leaves_decodes_their_share():
    plan = plan_slots(manifest(), max_step_tokens=64)
    assert plan.prefill_budget(0) == 256  # nothing decodes: the whole chunk
    assert plan.prefill_budget(8) == 48   # 64 - 8 = 56, in whole 16-token units
    assert plan.prefill_budget(60) == 16  # prompts always progress
    assert plan_slots(manifest(), max_step_tokens=1000).prefill_budget(8) == 256
    assert plan_slots(manifest(), prefill_chunk=8).prefill_budget(3) == 8
    bucketed = plan_slots(manifest(buckets=[128, 4096]), max_step_tokens=16)
    assert bucketed.prefill_budget(8) == 128  # the prefill graphs' one seq gear
    assert "64 tokens per step while decoding" in plan_slots(manifest()).describe()
    onnx = manifest(cache_mode="inplace")  # ONNX Runtime: a step costs its graph calls
    assert plan_slots(onnx).step_tokens == 128
    assert plan_slots(onnx, max_step_tokens=64).step_tokens == 64
    with pytest.raises(DsflowError, match="--max-step-tokens 0: must be >= 1"):
        plan_slots(manifest(), max_step_tokens=0)


def test_requests_that_cannot_fit():
    plan = plan_slots(manifest(max_seq_len=64), max_batch=2)
    plan.check_fits(60, SamplingParams(max_new_tokens=4))
    with pytest.raises(CacheLimitError, match="= 65 exceeds the maximum sequence length"):
        plan.check_fits(60, SamplingParams(max_new_tokens=5))
    with pytest.raises(CacheLimitError, match="n = 3 samples exceed the 2 sequences"):
        plan.check_fits(1, SamplingParams(n=3, max_new_tokens=4))


def test_gears():
    assert batch_gears(12) == [1, 2, 4, 8, 12] and batch_gears(1) == [1]
    assert gear(0, None, 128) == 128 and gear(129, None, 128) == 256
    with pytest.raises(CacheLimitError, match="batch \\(9\\) fits no shape gear"):
        gear(9, [1, 8], 1, "batch")


def test_slot_cache_windows_writes_and_copies():
    cache = SlotCache(layers=2, kv_heads=1, head_dim=2, slots=3, capacity=8)
    key = np.arange(2 * 1 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 1, 3, 2) + 1
    cache.write(np.array([2]), np.array([1]), np.array([3]), key, -key)
    k, v = cache.window(np.array([2, 0]), kv_len=5, rows=4)
    assert k.shape == (2, 4, 1, 5, 2)
    assert np.array_equal(k[:, 0, :, 1:4], key[:, 0]) and not k[:, 0, :, [0, 4]].any()
    assert not k[:, 1:].any() and np.array_equal(v, -k)  # slot 0 and padding rows: zeros
    cache.copy(2, [1], length=4)
    copied = cache.window(np.array([1]), 4, 1)[0].copy()
    assert copied.any() and np.array_equal(copied, cache.window(np.array([2]), 4, 1)[0])
    # a caller's buffers are reused by its next window of the same shape: refilled,
    # padding rows zeroed again, and other callers' windows untouched
    decode = cache.window(np.array([2, 0]), kv_len=5, rows=4, caller="decode")[0]
    prefill = cache.window(np.array([0]), kv_len=5, rows=4, caller="prefill")[0]
    again = cache.window(np.array([0, 2, 1]), kv_len=5, rows=4, caller="decode")[0]
    assert again is decode and np.array_equal(again[:, 1], k[:, 0]) and not again[:, 3].any()
    assert np.array_equal(cache.window(np.array([1]), 5, 4, caller="decode")[0][:, 0], k[:, 0])
    assert not cache.window(np.array([1]), 5, 4, caller="decode")[0][:, 1:].any()
    assert not prefill.any() and prefill is not decode
    with pytest.raises(ValueError, match="beyond the slot capacity 8"):
        cache.write(np.array([0]), np.array([7]), np.array([2]), key[:, :, :, :2], key[:, :, :, :2])
