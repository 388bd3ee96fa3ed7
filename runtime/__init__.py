"""dsflow runtime: tokenizer, sampling, rank workers and the generating coordinator."""
from .engine import Completion, Engine, StreamEvent
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamEvent"]
