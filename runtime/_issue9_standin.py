"""TEMPORARY (issue 10 branch only): the names of the issue-9 Engine contract
(/work/notes/ENGINE_API.md) that main does not have yet, so that the server and its
FakeEngine tests run before issue 9 lands. Deleted when the issue9 branch is merged."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..graphs.errors import DsflowError
from .kv_cache import CacheLimitError
from .protocol import WorkerError


class QueueFullError(DsflowError):
    pass


class EngineClosedError(DsflowError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            object.__setattr__(self, "max_new_tokens", self.max_tokens)
        object.__setattr__(self, "max_tokens", self.max_new_tokens)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list


@dataclass
class Completion:
    index: int
    prompt_token_ids: list
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    logprobs: Optional[list] = None
    prefill_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    time_to_first_token_ms: float = 0.0


@dataclass
class StreamEvent:
    index: int
    text: str
    token_ids: list
    logprobs: Optional[list] = None
    finished: Optional[Completion] = None


class RequestHandle:
    pass


__all__ = ["CacheLimitError", "Completion", "EngineClosedError", "QueueFullError",
           "RequestHandle", "SamplingParams", "StreamEvent", "TokenLogprob", "WorkerError"]
