"""Batch shape planning: alignment without buckets, smallest bucket with them."""
from __future__ import annotations

import numpy as np
import pytest

from dsflow.runtime.kv_cache import CacheLimitError, extend_cache, plan_shapes


def test_aligned_shapes_without_buckets():
    assert plan_shapes(5, 10, 512) == (16, 64)
    assert plan_shapes(17, 100, 512) == (32, 128)
    assert plan_shapes(500, 12, 512) == (512, 512)  # capped by max_seq_len


def test_buckets_pick_smallest_that_holds():
    buckets = [512, 1024, 2048]
    assert plan_shapes(100, 100, 4096, buckets) == (512, 512)
    assert plan_shapes(500, 100, 4096, buckets) == (512, 1024)
    with pytest.raises(CacheLimitError, match="fits no shape bucket"):
        plan_shapes(1500, 1000, 4096, buckets)


def test_over_max_seq_len_names_the_fix():
    with pytest.raises(CacheLimitError, match="--max-new-tokens"):
        plan_shapes(400, 200, 512)


def test_extend_cache_pads_with_zeros():
    c = np.arange(2 * 1 * 2 * 3 * 4, dtype=np.float32).reshape(2, 1, 2, 3, 4) + 1
    out = extend_cache(c, 8)
    assert out.shape == (2, 1, 2, 8, 4)
    assert np.array_equal(out[:, :, :, :3], c) and not out[:, :, :, 3:].any()
