"""dsflow runtime: tokenizer, sampling, rank workers and the generating coordinator."""
from dsflow.runtime.engine import Completion, Engine, StreamEvent
from dsflow.runtime.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamEvent"]
