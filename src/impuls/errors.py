"""The conditions Impuls raises on purpose, one class each.

They know nothing of HTTP: each front door (``impuls.api``) has one table that
maps a condition to its own wire answer.  ``SandboxError`` subclasses describe
an instance that failed; the engine turns them into invocation outcomes.
"""

from __future__ import annotations

import errno


class ImpulsError(Exception):
    """Base of every error Impuls raises on purpose; ``message`` is meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ImpulsError):
    """A request is well-formed but a field breaks a rule (the message names the field)."""


class NotFound(ImpulsError):
    """The named thing does not exist."""

    kind = "resource"

    def __init__(self, name: str) -> None:
        super().__init__(f"{self.kind} '{name}' not found")
        self.name = name


class AlreadyExists(ImpulsError):
    """A thing of that name exists already."""

    kind = "resource"

    def __init__(self, name: str) -> None:
        super().__init__(f"{self.kind} '{name}' already exists")
        self.name = name


class FunctionNotFound(NotFound):
    kind = "function"


class FunctionExists(AlreadyExists):
    kind = "function"


class EventNotFound(NotFound):
    kind = "asynchronous invocation"


class DeadLetterNotFound(NotFound):
    kind = "dead letter"


class KeyNotFound(NotFound):
    kind = "key"


class KeyExists(AlreadyExists):
    kind = "key"


class VersionNotFound(NotFound):
    """A function has no published version of that number."""

    kind = "version"

    def __init__(self, function: str, version: str) -> None:
        super().__init__(f"{function}:{version}")
        self.function, self.version = function, version


class AliasNotFound(NotFound):
    kind = "alias"

    def __init__(self, function: str, alias: str) -> None:
        super().__init__(f"{function}:{alias}")
        self.function, self.alias = function, alias


class AliasExists(AlreadyExists):
    kind = "alias"

    def __init__(self, function: str, alias: str) -> None:
        super().__init__(f"{function}:{alias}")
        self.function, self.alias = function, alias


class EventConfigNotFound(NotFound):
    """No event-invoke configuration for that function and qualifier."""

    kind = "event invoke config"


class UrlConfigNotFound(NotFound):
    """No function URL configuration for that function and qualifier."""

    kind = "function URL config"


class UrlConfigExists(AlreadyExists):
    kind = "function URL config"


class ScheduleNotFound(NotFound):
    """A function has no schedule of that name."""

    kind = "schedule"

    def __init__(self, function: str, schedule: str) -> None:
        super().__init__(f"{function}:{schedule}")
        self.function, self.schedule = function, schedule


class ScheduleExists(AlreadyExists):
    kind = "schedule"

    def __init__(self, function: str, schedule: str) -> None:
        super().__init__(f"{function}:{schedule}")
        self.function, self.schedule = function, schedule


class Conflict(ImpulsError):
    """The request is valid but the resource's current state does not allow it now."""


class UpdateInProgress(Conflict):
    """A function's last update is still being built (``last_update_status`` InProgress)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"function '{name}' has an update in progress (last_update_status "
                         "InProgress); retry when it is Successful or Failed")
        self.name = name


class VersionInUse(Conflict):
    """A version cannot be deleted while an alias routes to it."""

    def __init__(self, name: str, version: str, aliases: list[str]) -> None:
        super().__init__(f"version {version} of function '{name}' is used by alias "
                         f"{', '.join(repr(a) for a in aliases)}; point the alias elsewhere first")
        self.name, self.version, self.aliases = name, version, aliases


class FunctionNotReady(Conflict):
    """A function whose state is Pending (being created) or Failed (its package did not build)."""

    def __init__(self, name: str, state: str, reason: str | None = None) -> None:
        detail = "it is being created; retry when it is Active" if state == "Pending" else (
            f"its package did not build ({reason})" if reason else "its package did not build")
        super().__init__(f"function '{name}' is not ready: its state is {state}: {detail}")
        self.name, self.state = name, state


class PreconditionFailed(ImpulsError):
    """A given ``revision_id`` is not the resource's current one (it changed in between)."""


class FunctionInactive(ImpulsError):
    def __init__(self, name: str) -> None:
        super().__init__(f"function '{name}' is inactive; set status to 'active' to invoke it")


class Unauthenticated(ImpulsError):
    """A request without a key, or with a key that is unknown or revoked."""


class Forbidden(ImpulsError):
    """The key is valid but its scope (or its function pattern) does not allow this."""


class LocalModeDisabled(ImpulsError):
    def __init__(self) -> None:
        super().__init__(
            "local=true runs code unsandboxed on the host and is disabled; "
            "start the server with --allow-local (or IMPULS_ALLOW_LOCAL=1) to allow it"
        )


class PayloadTooLarge(ImpulsError):
    """A request body or an event is over its size limit."""


class UnsupportedMediaType(ImpulsError):
    """A body is not of a content type the operation accepts."""


class Throttled(ImpulsError):
    """A function's concurrency limit is reached and its wait queue is full (or the wait timed out)."""


class ShuttingDown(ImpulsError):
    """The server is draining and takes no new work."""


class StoreUnavailable(ImpulsError):
    """The database cannot be used now (SQLite locked beyond its busy timeout, PostgreSQL
    stopped or unreachable); nothing was changed, a retry may succeed."""


class StorageFull(ImpulsError):
    """The disk that holds the data directory has no space left; nothing was changed."""


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk is full (ENOSPC) or a quota is exhausted (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FunctionChanging(ImpulsError):
    """A function was replaced again and again while a call tried to start on it."""


class ConfigError(ImpulsError):
    """Settings that cannot work (bad value, missing images, unsupported sandbox)."""


# --- sandbox conditions ------------------------------------------------------


class SandboxError(ImpulsError):
    """An instance could not be started or stopped working.

    ``error_type`` is the Lambda-style type the caller sees; ``logs`` holds
    whatever the runtime printed.
    """

    error_type = "Sandbox.Error"

    def __init__(self, message: str, logs: str = "") -> None:
        super().__init__(message)
        self.logs = logs


class SandboxStartFailed(SandboxError):
    """The sandbox itself could not be created (not the user's code)."""

    error_type = "Sandbox.StartFailed"


class SandboxKilled(SandboxStartFailed):
    """The sandbox or its runtime process was killed from outside while the instance
    started (a signal it did not send itself, no init error reported, not out of memory):
    a fault of the platform, not of the function.  The engine starts the instance again
    on a new sandbox (a few times) and never replays it as an init failure."""


class InitFailed(SandboxError):
    """The runtime started but the function's code failed to load.

    ``error_type`` comes from the runtime (``Runtime.ImportModuleError``...).
    """

    def __init__(self, error_type: str, message: str, logs: str = "",
                 stack: list[str] | None = None) -> None:
        super().__init__(message, logs)
        self.error_type = error_type
        self.stack = stack or []


class InvocationTimedOut(SandboxError):
    error_type = "Sandbox.Timeout"


class RuntimeExited(SandboxError):
    """The runtime process (or VM) died while serving an invocation."""

    error_type = "Runtime.ExitError"


class RuntimeGoneBeforeCall(RuntimeExited):
    """The runtime died before it read the invocation (a warm instance killed while idle):
    the function never saw the call, so it can be served on another instance."""


class OutOfMemory(RuntimeExited):
    """The instance was killed for going over its memory limit."""

    error_type = "Runtime.OutOfMemory"
