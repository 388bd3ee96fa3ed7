"""A deterministic stand-in for the Ascend graphs, run by the fake mindspore_lite inside
real worker processes (tests/test_lite_cluster.py).

It keeps the graphs' signatures and makes every step depend on the whole cached
sequence, so a K/V written into the wrong slot or position, a window that misses a
position, or a wrong vocabulary slice changes the tokens: position t of a slot's keys
holds the token at position t, its values twice that, and the next token is
    (sum of all tokens so far) % 50 + 5,
reading the window only below each row's start / position (as the real graphs do:
anything beyond is stale or padding).

With resident-cache artifacts (prefill takes 6 inputs, decode 5: graphs/signatures.py)
it reads each row's slot out of the whole cache and returns the whole cache with the
row's new tokens written at (slot, position), as graphs/model.py SlotWriter does:
padding rows (valid_length 0, position -1) write nothing, and duplicate slots in one
call are refused (the real scatter's result would be undefined).
"""
from __future__ import annotations

import os
import re

import numpy as np

# the test config (tests/test_lite_cluster.py CFG): vocabulary (a multiple of tp),
# layers, KV heads before the split, head dim
VOCAB_PADDED, LAYERS, KV_HEADS, HEAD_DIM = 64, 2, 2, 8


def next_token(total: int) -> int:
    return int(total) % 50 + 5


def _logits(next_ids, path: str, width: int) -> np.ndarray:
    rank = int(re.search(r"rank(\d+)", path).group(1))
    full = np.zeros((len(next_ids), VOCAB_PADDED), np.float32)
    full[np.arange(len(next_ids)), next_ids] = 1.0
    return full[:, rank * width:(rank + 1) * width]


def _cached(keys: np.ndarray, values: np.ndarray, b: int, length: int) -> int:
    if not np.array_equal(values[:, b, :, :length], keys[:, b, :, :length] * 2):
        raise RuntimeError("value window does not match the key window")
    return int(keys[0, b, 0, :length, 0].astype(np.int64).sum())


def resident_kernel(model_path: str, arrays: list, width: int) -> list:
    if "prefill" in model_path:
        ids, keys, slots, start, lengths, values = arrays
        writes = [(b, start[b], ids[b, :lengths[b]]) for b in range(ids.shape[0])]
        seen = [start[b] for b in range(ids.shape[0])]
    else:
        ids, keys, pos, slots, values = arrays
        writes = [(b, pos[b], ids[b:b + 1] if pos[b] >= 0 else ids[:0])
                  for b in range(ids.shape[0])]
        seen = [max(int(p), 0) for p in pos]
    if len(set(slots.tolist())) != len(slots):
        raise RuntimeError(f"slot ids {slots.tolist()} repeat in one call")
    nxt = [next_token(_cached(keys, values, int(slots[b]), seen[b]) + int(tokens.sum()))
           for b, _, tokens in writes]
    keys, values = keys.copy(), values.copy()
    for b, at, tokens in writes:
        keys[:, slots[b], :, at:at + len(tokens)] = tokens[None, None, :, None]
        values[:, slots[b], :, at:at + len(tokens)] = 2 * tokens[None, None, :, None]
    return [_logits(nxt, model_path, width), keys, values]


def kernel(model_path: str, arrays: list) -> list:
    tp = int(os.environ["DSFLOW_FAKE_TP"])
    width = VOCAB_PADDED // tp
    if len(arrays) == (6 if "prefill" in model_path else 5):
        return resident_kernel(model_path, arrays, width)
    if "prefill" in model_path:
        ids, keys, start, lengths, values = arrays
        nxt = [next_token(_cached(keys, values, b, start[b]) + ids[b, :lengths[b]].sum())
               for b in range(ids.shape[0])]
    else:
        ids, keys, pos, values = arrays
        nxt = [next_token(_cached(keys, values, b, pos[b]) + ids[b])
               for b in range(ids.shape[0])]
        ids = ids[:, None]
    new = np.zeros((LAYERS, ids.shape[0], KV_HEADS // tp, ids.shape[1], HEAD_DIM), np.float16)
    new[:] = ids[None, :, None, :, None]
    return [_logits(nxt, model_path, width), new, new * 2]
