"""The exception tree: one class per condition, each knows its HTTP status.

``ImpulsError`` subclasses that reach the HTTP layer become
``{"error": true, "message": ...}`` with ``status``.  Sandbox errors are kept
apart: ``SandboxError`` subclasses describe an instance that failed, and the
engine turns them into invocation results with an ``error_type``.
"""

from __future__ import annotations


class ImpulsError(Exception):
    """Base of every error Impuls raises on purpose."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ImpulsError):
    """The request is well-formed but a field breaks a rule."""

    status = 400


class FunctionNotFound(ImpulsError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"function '{name}' not found")
        self.name = name


class FunctionExists(ImpulsError):
    status = 409

    def __init__(self, name: str) -> None:
        super().__init__(f"function '{name}' already exists")
        self.name = name


class FunctionInactive(ImpulsError):
    status = 403

    def __init__(self, name: str) -> None:
        super().__init__(f"function '{name}' is inactive; set status to 'active' to invoke it")


class LocalModeDisabled(ImpulsError):
    status = 403

    def __init__(self) -> None:
        super().__init__(
            "local=true runs code unsandboxed on the host and is disabled; "
            "start the server with --allow-local (or IMPULS_ALLOW_LOCAL=1) to allow it"
        )


class PayloadTooLarge(ImpulsError):
    status = 413


class UnsupportedMediaType(ImpulsError):
    status = 415


class TooManyRequests(ImpulsError):
    """Concurrency limit reached and the wait queue is full (or waiting timed out)."""

    status = 429


class ServiceUnavailable(ImpulsError):
    """The server is shutting down or cannot run this kind of sandbox."""

    status = 503


class ConfigError(ImpulsError):
    """Settings that cannot work (bad value, missing images, unsupported sandbox)."""


# --- sandbox conditions ------------------------------------------------------


class SandboxError(ImpulsError):
    """An instance could not be started or stopped working.

    ``error_type`` is the Lambda-style type the caller sees; ``logs`` holds
    whatever the runtime printed.
    """

    error_type = "Sandbox.Error"
    status = 502

    def __init__(self, message: str, logs: str = "") -> None:
        super().__init__(message)
        self.logs = logs


class SandboxStartFailed(SandboxError):
    """The sandbox itself could not be created (not the user's code)."""

    error_type = "Sandbox.StartFailed"


class InitFailed(SandboxError):
    """The runtime started but the function's code failed to load.

    ``error_type`` comes from the runtime (``Runtime.ImportModuleError``...).
    """

    status = 200

    def __init__(self, error_type: str, message: str, logs: str = "",
                 stack: list[str] | None = None) -> None:
        super().__init__(message, logs)
        self.error_type = error_type
        self.stack = stack or []


class InvocationTimedOut(SandboxError):
    error_type = "Sandbox.Timeout"
    status = 504


class RuntimeExited(SandboxError):
    """The runtime process (or VM) died while serving an invocation."""

    error_type = "Runtime.ExitError"
    status = 502


class OutOfMemory(RuntimeExited):
    """The instance was killed for going over its memory limit."""

    error_type = "Runtime.OutOfMemory"
    status = 200


class ResponseTooLarge(SandboxError):
    error_type = "Function.ResponseSizeTooLarge"
    status = 200


class InstanceClosed(SandboxError):
    """The instance was destroyed by Impuls (retired, shut down) during use."""

    error_type = "Sandbox.Closed"
    status = 503
