"""Coordinator <-> rank worker messages, and the environment a worker is started with.

Transport: `multiprocessing.connection` over 127.0.0.1, authenticated with a random
per-run key (HMAC challenge), so only processes this coordinator started can speak
to it. Messages are (op, payload) tuples; tensors travel as numpy arrays. Only token
ids go to the workers, and what comes back is what sampling needs: the KV cache and
the logits never leave their worker (runtime/vocab_sampling.py).

Requests (coordinator -> every worker):
    ("configure", {"slots": int, "capacity": int, "vocab_limit": int})
                               allocate the slot KV cache; ids >= vocab_limit are never sampled
    ("prefill", {"slot_ids": int32 [b], "input_ids": int32 [b, s], "start": int32 [b],
                 "valid_length": int32 [b], "kv_len": int, "sample": [SampleSpec] | None})
                               a chunk of each row's prompt at start[b].. into its slot
    ("decode",  {"slot_ids": int32 [b], "input_ids": int32 [b], "positions": int32 [b],
                 "kv_len": int, "sample": [SampleSpec] | None})
                               one token per row at positions[b] into its slot
    ("resample", {"sample": [SampleSpec], "k": int})   k candidates (0: the whole slice)
                               of the last step's rows: when the first ones did not decide
    ("copy_slot", {"src": int, "dst": [int], "length": int})   n samples share a prefill
    ("stats", {})              memory: {"rss_bytes", "rss_peak_bytes"}
    ("exit", {})               replies with the same memory figures, then exits
kv_len is the window of the slots the step attends over (>= every row's cached length).
Replies (worker -> coordinator):
    ("ready", {"rank", "pid", "load_s", "rss_bytes", "rss_peak_bytes"})  once, when loaded
    ("progress", {"rank", "message"})   start-up lines (Lite warm-up)
    ("picks", [Pick])                   tp = 1: the chosen tokens, one per SampleSpec
    ("candidates", [RankCandidates])    tp > 1: this rank's share, merged by the coordinator
    ("logits", float32 [b, vocab_padded / tp])   "sample": None (teacher forcing)
    ("ok", {...})
    ("error", {"rank", "message", "traceback", "fatal"})
        fatal: the worker is exiting; else the op failed (bad input, a backend error)
        and the worker serves the next one.
"""
from __future__ import annotations

from dsflow.common.errors import DsflowError

# the per-run key of the connection (hex), set by the cluster for each child
AUTHKEY_ENV = "DSFLOW_AUTHKEY"
# kernel threads per rank (MindSpore's runtime_num_threads)
THREADS_ENV = "DSFLOW_THREADS"
# "0": skip the start-up warm-up of backends that have one (Lite: every GE gear once)
WARMUP_ENV = "DSFLOW_WARMUP"


class WorkerError(DsflowError):
    """A rank failed or stopped answering; the message names the rank and what it
    reported. The worker cluster must be restarted."""


class StepError(DsflowError):
    """A step failed on the ranks (a backend error for its input) while every rank kept
    serving: the requests of that step end with it; the engine goes on."""
