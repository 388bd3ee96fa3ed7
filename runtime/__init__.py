"""dsflow runtime: tokenizer, sampling, rank workers and the continuous-batching engine."""
from .engine import Engine
from .protocol import WorkerError
from .requests import (Completion, EngineClosedError, QueueFullError, RequestHandle,
                       StreamEvent)
from .sampling import SamplingParams, TokenLogprob
from .slot_cache import CacheLimitError

__all__ = ["CacheLimitError", "Completion", "Engine", "EngineClosedError", "QueueFullError",
           "RequestHandle", "SamplingParams", "StreamEvent", "TokenLogprob", "WorkerError"]
