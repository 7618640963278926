"""The Lambda door's wire answers for conditions: one table, Lambda's error shape.

An error is the HTTP status, ``x-amzn-ErrorType: <code>`` and
``{"Type": "User"|"Service", "message": ..., "Message": ...}``: botocore reads the
code from the header and the message from either key.
"""

from __future__ import annotations

import json

from impuls.auth.sigv4 import SignatureRejected
from impuls.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    FunctionInactive,
    ImpulsError,
    InvalidInput,
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

#: condition → (HTTP status, Lambda error code); the first match along the class's bases wins
ERROR_CODES: dict[type[ImpulsError], tuple[int, str]] = {
    InvalidInput: (400, "InvalidParameterValueException"),
    Unauthenticated: (403, "UnrecognizedClientException"),
    Forbidden: (403, "AccessDeniedException"),
    NotFound: (404, "ResourceNotFoundException"),
    AlreadyExists: (409, "ResourceConflictException"),
    Conflict: (409, "ResourceConflictException"),
    FunctionInactive: (409, "ResourceConflictException"),
    PreconditionFailed: (412, "PreconditionFailedException"),
    PayloadTooLarge: (413, "RequestTooLargeException"),
    UnsupportedMediaType: (415, "UnsupportedMediaTypeException"),
    Throttled: (429, "TooManyRequestsException"),
    ShuttingDown: (503, "ServiceException"),
    StorageFull: (507, "ServiceException"),
    StoreUnavailable: (503, "ServiceException"),
}
SERVICE_ERROR = (500, "ServiceException")
#: what a throttled caller is told to wait (seconds)
RETRY_AFTER = "1"


class OperationNotSupported(ImpulsError):
    """An operation of Lambda's service model that Impuls does not offer."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"Impuls does not support the Lambda operation {operation}; "
                         "see docs/lambda-api.md for the operations it offers")


def error_of(exc: ImpulsError) -> tuple[int, str]:
    if isinstance(exc, SignatureRejected):
        return 403, exc.code
    if isinstance(exc, OperationNotSupported):
        return 501, "UnsupportedOperationException"
    for cls in type(exc).__mro__:
        found = ERROR_CODES.get(cls)
        if found is not None:
            return found
    return SERVICE_ERROR


def error_reply(status: int, code: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of a Lambda error."""
    doc: dict[str, str] = {"Type": "Service" if status >= 500 else "User", "message": message,
                           "Message": message}
    headers = [(b"x-amzn-errortype", code.encode())]
    if code == "TooManyRequestsException":
        doc["Reason"] = "ReservedFunctionConcurrentInvocationLimitExceeded"
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    return status, headers, json.dumps(doc).encode()
