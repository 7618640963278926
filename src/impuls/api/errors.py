"""The native API's wire answers: one table from condition to HTTP status, one error body.

Every failure on ``/api/v1`` is ``{"error": true, "message": ...}`` with the
status :func:`status_of` gives; an invocation's outcome maps to the HTTP status
and the envelope's ``status_code`` through :data:`OUTCOME_STATUS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from impuls.engine.results import Outcome
from impuls.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    FunctionChanging,
    FunctionInactive,
    ImpulsError,
    InvalidInput,
    LocalModeDisabled,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    ShuttingDown,
    StorageFull,
    StoreUnavailable,
    Throttled,
    Unauthenticated,
    UnsupportedMediaType,
)

#: condition → HTTP status; a condition not listed (nor any of its bases) is a 500
ERROR_STATUS: dict[type[ImpulsError], int] = {
    InvalidInput: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    FunctionInactive: 403,
    LocalModeDisabled: 403,
    NotFound: 404,
    AlreadyExists: 409,
    Conflict: 409,
    PreconditionFailed: 412,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    Throttled: 429,
    FunctionChanging: 503,
    ShuttingDown: 503,
    StorageFull: 507,
    StoreUnavailable: 503,
}

#: invocation outcome → (HTTP status, the envelope's ``status_code``)
OUTCOME_STATUS: dict[Outcome, tuple[int, int]] = {
    Outcome.SUCCESS: (200, 200),
    Outcome.ERROR: (200, 500),
    Outcome.INIT_ERROR: (200, 500),
    Outcome.OOM: (200, 500),
    Outcome.TIMEOUT: (504, 504),
    Outcome.CRASH: (502, 502),
}


def status_of(exc: ImpulsError) -> int:
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return 500


class ErrorReply(BaseModel):
    """The one error shape of /api/v1: ``{"error": true, "message": "..."}``."""

    model_config = ConfigDict(extra="forbid")

    error: Literal[True]
    message: str


def error_body(message: str) -> bytes:
    return json.dumps({"error": True, "message": message}).encode()


#: what a 401 answer carries besides the error body
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="impuls"'}


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**CHALLENGE, **(headers or {})}
    return JSONResponse({"error": True, "message": message}, status_code=status, headers=headers)
