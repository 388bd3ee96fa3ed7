"""The requests dsserve accepts, and OpenAI's error shape for the ones it does not.

Bodies are parsed here rather than by FastAPI's automatic body binding, because a
client's mistake must always become a 400 naming the field, never a dropped
connection: Python's json module accepts NaN/Infinity and lone UTF-16 surrogates
("\\ud800"), both of which would fail later, deep in sampling or tokenization.
Unknown fields are refused (an ignored `n` or `logprobs` silently gives the wrong
answer); fields OpenAI defines but dsflow cannot honour are accepted only at their
neutral value.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsflow.runtime.server.errors import bad_request

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


# ---- body parsing ---------------------------------------------------------------------
def _reject_constant(name: str) -> float:
    raise bad_request(f"body is not valid JSON: {name} is not a JSON number",
                      code="invalid_json")


def _check_strings(value: Any, path: str = "") -> None:
    """Lone surrogates cannot be encoded to UTF-8: refuse them where they are."""
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise bad_request(f"{path or 'body'}: string contains a lone UTF-16 surrogate "
                              "(invalid Unicode)", param=path or None, code="invalid_unicode")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, path)
            _check_strings(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{path}[{i}]")


def parse_json_object(raw: bytes) -> dict:
    """The request body as a dict, or an ApiError saying what is wrong with it."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("body is not valid JSON: nested too deeply",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object", code="invalid_json")
    _check_strings(body)
    return body


def _describe(error: dict) -> tuple[str, str]:
    """One pydantic error as (param, message) in the client's field names."""
    loc = ""
    for part in error["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else f".{part}" if loc else str(part)
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown or unsupported parameter"
    elif error["type"] == "missing":
        msg = "required"
    return loc, msg


def validate(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]  # the first is enough to fix; OpenAI reports one param too
        param, msg = _describe(error)
        code = "unsupported_parameter" if error["type"] == "extra_forbidden" else "invalid_value"
        raise bad_request(f"'{param}': {msg}", param=param, code=code) from None


# ---- request models -----------------------------------------------------------------
class _Strict(BaseModel):
    # strict: "temperature": "0.5" or "n": 1.0 are errors, not silently coerced
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(s == "" for s in stops):
        raise ValueError("an empty stop string would stop at once")
    return stops


class _Sampling(_Strict):
    """The fields completions and chat share."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)                 # extension (vLLM's name)
    n: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)  # extension (vLLM's name)
    ignore_eos: bool = False                                  # extension (vLLM's name)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None                                # an identifier: logged only
    # OpenAI fields accepted at their neutral value only
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    _stop = field_validator("stop", mode="before")(_stop_list)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: Optional[float]) -> Optional[float]:
        if v not in (None, 0.0):
            raise ValueError("not supported by dsserve (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: Optional[dict]) -> Optional[dict]:
        if v:
            raise ValueError("not supported by dsserve")
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, v: Optional[StreamOptions], info) -> Optional[StreamOptions]:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when 'stream' is true")
        return v


def _prompt(value: Any) -> Union[list[str], list[list[int]]]:
    """OpenAI's four prompt forms as a list of prompts (text or token ids)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if all(type(t) is int for t in value):
            return [value]
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in value):
            return value
    raise ValueError("must be a string, a list of strings, a list of token ids or a "
                     "list of lists of token ids, and not empty")


class CompletionRequest(_Sampling):
    prompt: list[Union[str, list[int]]]
    suffix: Optional[str] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)         # OpenAI's bound
    best_of: Optional[int] = None

    _prompt = field_validator("prompt", mode="before")(_prompt)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: Optional[int], info) -> Optional[int]:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("not supported by dsserve (only equal to n)")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r}: only 'text' parts are "
                                     "supported")
        elif not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        return v

    def text(self) -> str:
        # text parts joined by newlines, as vLLM does for the same input
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: Optional[int], info) -> Optional[int]:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when 'logprobs' is true")
        return v

    def token_limit(self) -> Optional[int]:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; give one",
                              param="max_completion_tokens")
        return self.max_completion_tokens or self.max_tokens
