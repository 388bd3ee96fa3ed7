"""Coordinator <-> worker messages.

Transport: `multiprocessing.connection` over 127.0.0.1, authenticated with a random
per-run key (HMAC challenge), so only processes this coordinator started can speak
to it. Messages are (op, payload) tuples; tensors travel as numpy arrays. Only token
ids go to the workers and only each rank's logits slice comes back: the KV cache
never leaves its worker.

Requests (coordinator -> every worker):
    ("prefill", {"input_ids": int32 [b, s], "valid_length": int32 [b], "kv_len": int})
    ("decode",  {"input_ids": int32 [b], "positions": int32 [b]})
    ("release", {})            drop the cache of the current batch
    ("stats", {})              memory: {"rss_bytes", "rss_peak_bytes"}
    ("exit", {})               replies with the same memory figures, then exits
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
