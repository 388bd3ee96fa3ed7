"""Coordinator <-> worker messages.

Transport: `multiprocessing.connection` over 127.0.0.1, authenticated with a random
per-run key (HMAC challenge), so only processes this coordinator started can speak
to it. Messages are (op, payload) tuples; tensors travel as numpy arrays. Only token
ids go to the workers and only each rank's logits slice comes back: the KV cache
never leaves its worker.

Requests (coordinator -> every worker):
    ("configure", {"slots": int, "capacity": int})   allocate the slot KV cache
    ("prefill", {"slot_ids": int32 [b], "input_ids": int32 [b, s], "start": int32 [b],
                 "valid_length": int32 [b], "kv_len": int})
                               a chunk of each row's prompt at start[b].. into its slot
    ("decode",  {"slot_ids": int32 [b], "input_ids": int32 [b], "positions": int32 [b],
                 "kv_len": int})   one token per row at positions[b] into its slot
    ("copy_slot", {"src": int, "dst": [int], "length": int})   n samples share a prefill
    ("stats", {})              memory: {"rss_bytes", "rss_peak_bytes"}
    ("exit", {})               replies with the same memory figures, then exits
kv_len is the window of the slots the step attends over (>= every row's cached length).
Replies (worker -> coordinator):
    ("ready", {"rank", "pid", "load_s", "rss_bytes", "rss_peak_bytes"})  once, when loaded
    ("logits", float32 [b, vocab_padded / tp])
    ("ok", {...})
    ("error", {"rank", "message", "traceback"})
"""
from __future__ import annotations

from dsflow.common.errors import DsflowError

AUTHKEY_ENV = "DSFLOW_AUTHKEY"


class WorkerError(DsflowError):
    """A rank failed; the message names the rank and what it reported."""
