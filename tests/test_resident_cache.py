"""The resident cache mode on CPU: the portable graphs built with `--cache-mode resident`
take and return the whole slot cache (gathered rows attended, new K/V scattered in,
graphs/model.py SlotWriter), and the MindSpore backend feeds each step's output pair
back in. This is the cache plumbing the Ascend graphs share (they differ only in the
attention kernels), so tokens equal to the window mode's and to transformers' here are
the check of that plumbing that can run without an NPU.

Every wait is bounded (result(timeout=...)).
"""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from conftest import SMALL
from dsflow.runtime import Engine, SamplingParams
from test_parity import PROMPTS, hf_greedy

T = 120
MAX_SEQ = 128  # the resident graphs attend over the whole capacity: keep it small
GREEDY = SamplingParams(max_new_tokens=20, ignore_eos=True)
# 4 slots: batch gears 1, 2, 4, so a step of 3 rows has a padding row (in a spare slot)
RESIDENT_SMALL = {**SMALL, "max_batch": 4}
_ART: dict[int, object] = {}
_ENGINES: dict[int, Engine] = {}


@pytest.fixture(scope="module")
def resident_engine(tiny_checkpoint, tmp_path_factory):
    """tp -> an Engine (4 slots, SMALL chunks) on resident-mode artifacts of the tiny model."""
    from dsflow.export.pipeline.build import BuildOptions, build

    def get(tp: int) -> Engine:
        if tp not in _ENGINES:
            out = tmp_path_factory.mktemp(f"resident-tp{tp}") / "artifacts"
            _ART[tp] = build(BuildOptions(model_dir=tiny_checkpoint, out=out, tp=tp,
                                          max_seq_len=MAX_SEQ, cache_mode="resident"))
            _ENGINES[tp] = Engine(_ART[tp], **RESIDENT_SMALL)
        return _ENGINES[tp]
    yield get
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()


def tokens(handle) -> list[int]:
    return handle.result(timeout=T)[0].token_ids


def test_resident_artifacts_record_the_mode_and_the_whole_cache_signature(resident_engine):
    resident_engine(1)
    data = json.loads((_ART[1] / "manifest.json").read_text())
    assert data["kv_cache"]["cache_mode"] == "resident"
    assert "slots" not in data["kv_cache"]  # CPU graphs take any slots / capacity
    decode = next(g for g in data["graphs"] if g["kind"] == "decode")
    assert [t["name"] for t in decode["inputs"]] == ["input_ids", "key_cache", "positions",
                                                     "slot_ids", "value_cache"]
    assert decode["inputs"][1]["shape"] == [2, "slots", 4, "capacity", 8]
    assert [t["shape"] for t in decode["outputs"][1:]] == [[2, "slots", 4, "capacity", 8]] * 2


@pytest.mark.parametrize("tp", [1, 2])
def test_resident_tokens_equal_window_tokens_and_transformers(tp, resident_engine,
                                                              small_engine_for, hf_model):
    """Requests joining at different steps (while others prefill in chunks and decode,
    padded up to batch gears, with n = 2 samples copying a slot) get the tokens they get
    alone, which are the window mode's and transformers'."""
    engine, window = resident_engine(tp), small_engine_for(tp)
    prompts = [engine.encode(p) for p in PROMPTS]
    alone = [tokens(engine.submit(ids, GREEDY)) for ids in prompts]
    with torch.no_grad():
        assert alone == [hf_greedy(hf_model, ids, GREEDY.max_new_tokens) for ids in prompts]
    assert alone == [tokens(window.submit(ids, GREEDY)) for ids in prompts]
    # shared steps: a long sampled request first, then the greedy ones one by one as the
    # earlier ones are a few tokens in (so they join mid-decode and mid-prefill)
    a = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, temperature=0.8, seed=3,
                                                 n=2, ignore_eos=True))
    reading = [iter(a)]  # kept: dropping an iterator early cancels its request
    next(reading[0])
    handles = []
    for ids in prompts:
        handles.append(engine.submit(ids, GREEDY))
        reading.append(iter(handles[-1]))
        next(reading[-1])
    assert [tokens(h) for h in handles] == alone
    assert all(len(c.token_ids) == 40 for c in a.result(timeout=T))


def test_padding_rows_never_gather_row_minus_one():
    """An all-padding prefill row (valid_length 0, the resident warm-up's) reads its own
    first row, not index -1."""
    import mindspore as ms
    from dsflow.graphs.model import last_token_rows
    rows = last_token_rows(ms.Tensor(np.array([0, 3, 1], np.int32)), 4)
    assert rows.asnumpy().tolist() == [0, 6, 8]
