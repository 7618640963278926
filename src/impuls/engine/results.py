"""What one invocation produced, in one shape for every front door.

A door turns an :class:`InvocationResult` into its own wire answer (the
native envelope, Lambda's invoke reply, a function URL's HTTP response); the
engine records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from impuls.errors import InitFailed, InvocationTimedOut, OutOfMemory, SandboxError
from impuls.sandbox.runtime_api import (
    RESPONSE_TOO_LARGE,
    STREAM_TOO_LARGE_MESSAGE,
    RuntimeReply,
    parse_error,
)


class Outcome(StrEnum):
    SUCCESS = "success"
    #: the handler raised, or its result could not be sent (too large, not serialisable)
    ERROR = "error"
    #: the function's code failed to load
    INIT_ERROR = "init_error"
    TIMEOUT = "timeout"
    OOM = "oom"
    #: the runtime or its sandbox died, or the sandbox could not be made
    CRASH = "crash"


@dataclass
class InvocationResult:
    """``payload`` is the runtime's response bytes (success); the ``error*`` fields and
    ``stack`` describe any other outcome.  ``streamed``: the response went, piece by piece,
    to the caller's stream (``payload`` is empty; the outcome says how the stream ended)."""

    request_id: str
    outcome: Outcome
    cold_start: bool
    logs: str = ""
    logs_truncated: bool = False
    payload: bytes = b""
    error_type: str | None = None
    error_message: str = ""
    stack: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    #: how a cold start was served (microvm: restored or booted, and why)
    note: str = ""
    #: the version that ran: "$LATEST" or a published version's number
    executed_version: str = "$LATEST"
    streamed: bool = False

    @classmethod
    def from_reply(cls, request_id: str, reply: RuntimeReply, cold_start: bool, logs: str,
                   logs_truncated: bool, note: str = "") -> InvocationResult:
        """The result of a call the runtime answered (with a response or an error document)."""
        result = cls(request_id, Outcome.SUCCESS, cold_start, logs, logs_truncated, note=note,
                     streamed=reply.streamed)
        if reply.ok:
            result.payload = reply.body
        elif reply.error_type == RESPONSE_TOO_LARGE:
            result.outcome, result.error_type = Outcome.ERROR, RESPONSE_TOO_LARGE
            result.error_message = (STREAM_TOO_LARGE_MESSAGE if reply.streamed
                                    else "the function's response exceeds the 6 MB limit")
        else:
            info = parse_error(reply.body, reply.error_type)
            result.outcome, result.error_type = Outcome.ERROR, info["errorType"]
            result.error_message, result.stack = info["errorMessage"], info["stackTrace"]
        return result

    @classmethod
    def from_error(cls, request_id: str, exc: SandboxError) -> InvocationResult:
        """The result of a call that ended in a sandbox condition."""
        stack = exc.stack if isinstance(exc, InitFailed) else []
        return cls(request_id, _outcome_of(exc), isinstance(exc, InitFailed), exc.logs,
                   error_type=exc.error_type, error_message=exc.message, stack=stack)


def _outcome_of(exc: SandboxError) -> Outcome:
    if isinstance(exc, InitFailed):
        return Outcome.INIT_ERROR
    if isinstance(exc, OutOfMemory):
        return Outcome.OOM
    if isinstance(exc, InvocationTimedOut):
        return Outcome.TIMEOUT
    return Outcome.CRASH
