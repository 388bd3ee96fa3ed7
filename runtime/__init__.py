"""dsflow runtime: tokenizer, sampling, rank workers and the continuous-batching engine."""
from dsflow.runtime.engine import Engine
from dsflow.runtime.worker_protocol import StepError, WorkerError
from dsflow.runtime.outputs import (Completion, EngineClosedError, QueueFullError,
                                     RequestHandle, StreamEvent)
from dsflow.runtime.sampling import SamplingParams, TokenLogprob
from dsflow.runtime.slot_cache import CacheLimitError

__all__ = ["CacheLimitError", "Completion", "Engine", "EngineClosedError", "QueueFullError",
           "RequestHandle", "SamplingParams", "StepError", "StreamEvent", "TokenLogprob",
           "WorkerError"]
