"""dsflow runtime: tokenizer, sampling, rank workers and the generating coordinator."""
from .engine import Engine
from ._issue9_standin import (CacheLimitError, Completion, EngineClosedError, QueueFullError,
                              RequestHandle, SamplingParams, StreamEvent, TokenLogprob,
                              WorkerError)

__all__ = ["CacheLimitError", "Completion", "Engine", "EngineClosedError", "QueueFullError",
           "RequestHandle", "SamplingParams", "StreamEvent", "TokenLogprob", "WorkerError"]
