"""OpenAI's response and stream-chunk shapes, built from the engine's results.

Field by field as the official client's types declare them (openai.types.Completion,
ChatCompletion, ChatCompletionChunk), plus `token_ids` on each choice as an extension
(vLLM's name), so that callers can check exactly what the model produced.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from dsflow.runtime import TokenLogprob

TokenText = Callable[[int], str]


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def sse(obj: object) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def usage(prompt_token_ids: Sequence[Sequence[int]], completion_tokens: int) -> dict:
    prompt = sum(len(p) for p in prompt_token_ids)  # each prompt counted once, whatever n
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    # the engine also knows "cancelled"; OpenAI's clients know only these two here
    return None if reason is None else "length" if reason == "length" else "stop"


@dataclass
class LegacyLogprobs:
    """Completions' logprobs: parallel lists, top alternatives as {token text: logprob}.
    `offset` carries text_offset on across the chunks of a stream."""
    token_text: TokenText
    offset: int = 0

    def format(self, entries: Sequence[TokenLogprob]) -> dict:
        tokens, offsets = [], []
        for e in entries:
            text = self.token_text(e.token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


@dataclass
class ChunkWriter:
    """The chunks of one streamed response: common fields, and the role delta that
    must open each chat choice."""
    chat: bool
    model: str
    include_usage: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    opened: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.chat)

    def _chunk(self, choices: list, usage_obj: Optional[dict] = None) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat
               else "text_completion", "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:  # null on every chunk but the last, as OpenAI sends it
            obj["usage"] = usage_obj
        return sse(obj)

    def text(self, index: int, text: str, token_ids: list[int], logprobs: Optional[dict],
             reason: Optional[str]) -> bytes:
        if not self.chat:
            return self._chunk([{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason(reason),
                                 "token_ids": token_ids}])
        out = b""
        if index not in self.opened:
            self.opened.add(index)
            out += self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}])
        if text or token_ids:
            out += self._chunk([{"index": index, "delta": {"content": text},
                                 "logprobs": logprobs, "finish_reason": None,
                                 "token_ids": token_ids}])
        if reason is not None:
            out += self._chunk([{"index": index, "delta": {}, "logprobs": None,
                                 "finish_reason": finish_reason(reason)}])
        return out

    def usage(self, prompt_token_ids: Sequence[Sequence[int]], completion_tokens: int) -> bytes:
        return self._chunk([], usage(prompt_token_ids, completion_tokens))


def error_event(body: dict) -> bytes:
    """An error in the middle of a stream: the official client raises APIError on it."""
    return sse(body) + sse("[DONE]")


def completion_body(chat: bool, model: str, choices: list[dict],
                    prompt_token_ids: Sequence[Sequence[int]], completion_tokens: int) -> dict:
    return {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_token_ids, completion_tokens)}
