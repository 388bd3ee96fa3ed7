"""dsflow runtime: tokenizer, sampling, rank workers and the generating coordinator."""
from .engine import Completion, Engine, StreamEvent  # noqa: F401
from .sampling import SamplingParams  # noqa: F401
