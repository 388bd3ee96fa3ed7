"""A deterministic stand-in for the Ascend graphs, run by the fake mindspore_lite inside
real worker processes (tests/test_lite_cluster.py).

It keeps the graphs' signatures and makes every step depend on the whole KV cache, so
a cache lost between prefill and decode, a missed ping-pong swap, a wrong position or a
wrong vocabulary slice changes the tokens: slot t of the key cache holds the token at
position t, the value cache twice that, and the next token is
    (sum of all tokens so far) % 50 + 5.
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


def kernel(model_path: str, arrays: list) -> list:
    tp = int(os.environ["DSFLOW_FAKE_TP"])
    width = VOCAB_PADDED // tp
    if "prefill" in model_path:
        ids, lengths = arrays
        keys = np.zeros((LAYERS, ids.shape[0], KV_HEADS // tp, ids.shape[1], HEAD_DIM),
                        np.float16)
        keys[:] = ids[None, :, None, :, None]
        nxt = [next_token(ids[b, :lengths[b]].sum()) for b in range(ids.shape[0])]
        return [_logits(nxt, model_path, width), keys, keys * 2]
    ids, keys, pos, values = arrays
    if not np.array_equal(values, keys * 2):
        raise RuntimeError("value cache does not match the key cache")
    keys, values = keys.copy(), values.copy()
    for i in range(len(ids)):
        keys[:, i, :, pos[i]] = ids[i]
        values[:, i, :, pos[i]] = 2 * ids[i]
    slots = np.arange(keys.shape[3])
    nxt = [next_token(keys[0, i, 0, slots <= pos[i], 0].astype(np.int64).sum())
           for i in range(len(ids))]
    return [_logits(nxt, model_path, width), keys, values]
