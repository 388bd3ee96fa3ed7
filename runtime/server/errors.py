"""Every failure as an HTTP answer in OpenAI's error shape, mapped in one place.

{"error": {"message", "type", "param", "code"}}: the official client turns `type`
and the status into its exception classes (BadRequestError, RateLimitError, ...).
"""
from __future__ import annotations

import logging
from typing import Optional

from dsflow.common.errors import DsflowError
from dsflow.runtime import (CacheLimitError, EngineClosedError, QueueFullError, StepError,
                            WorkerError)

log = logging.getLogger("dsflow.server")

RETRY_AFTER_FULL_S = 1        # a queue slot frees within a few decode steps
RETRY_AFTER_RESTART_S = 10    # a worker cluster restart takes seconds to a minute


class ApiError(Exception):
    """A failure answered to a client; rendered as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: Optional[str] = None,
                code: Optional[str] = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code,
                    headers={"Retry-After": str(RETRY_AFTER_RESTART_S)})


def from_exception(e: BaseException) -> ApiError:
    """The answer for an exception raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_FULL_S)})
    if isinstance(e, CacheLimitError):
        return bad_request(str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, WorkerError):
        return unavailable(f"the engine failed during this request: {e}", "worker_failed")
    if isinstance(e, EngineClosedError):
        return unavailable(f"the engine is not running: {e}", "engine_unavailable")
    if isinstance(e, StepError):  # the ranks refused this request's step; they serve on
        return ApiError(500, f"the model could not run this request: {e}",
                        type="server_error", code="step_failed")
    if isinstance(e, DsflowError):  # sampling values, prompts, tokenizer: the caller's input
        return bad_request(str(e))
    log.error("internal error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                    code="internal_error")
