"""The native API's contract as ``/openapi.json`` states it: request bodies, answers, errors.

Routes read their bodies themselves (size limit first, then JSON) and the rules live with
what they govern (:mod:`impuls.functions.models`, the registry, the schedule store), so the
models here describe and do not check.  The one rule for them: **never stricter than the
checks.**  ``tests/test_contract.py`` runs Schemathesis against a real server, sending what
these schemas forbid and expecting a 4xx, and checking every answer against them; a schema
may be looser (a function name's pattern, a known runtime) where a rule needs the store or
a runtime to decide.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from impuls.api.errors import ErrorReply
from impuls.functions import urls
from impuls.functions.models import FunctionConfig

#: component name → JSON schema of every request body below (added to /openapi.json)
REQUEST_BODIES: dict[str, dict[str, Any]] = {}


class _Out(BaseModel):
    """An answer: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


# --- request bodies (each with an example that works on a new server, for the fuzzer to build on)


def _example(value: dict[str, Any]) -> dict[str, Any]:
    return {"examples": [value]}



class FunctionCreate(FunctionConfig):
    """``POST /api/v1/functions``: the fields of :class:`FunctionConfig`, code, role, tags."""

    model_config = ConfigDict(json_schema_extra=_example({
        "name": "hello", "runtime": "python3.11", "handler": "handler.handler",
        "code": "def handler(event, context):\n    return event\n"}))

    code: str | None = Field(None, description="the source of one file")
    code_zip: str | None = Field(None, description="a base64 zip archive")
    role: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


def _update_schema() -> dict[str, Any]:
    """A create's fields, none required, no tags (they have their own Lambda operations)."""
    schema = FunctionCreate.model_json_schema()
    schema.pop("required", None)
    schema["properties"].pop("tags")
    schema["title"] = "FunctionUpdate"
    return schema


class Concurrency(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_example({"reserved_concurrency": 5}))
    reserved_concurrency: int = Field(ge=0)


class VersionPublish(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    code_sha256: str | None = None
    revision_id: str | None = None


class AliasCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_example(
        {"name": "live", "function_version": "$LATEST"}))
    name: str
    function_version: str
    description: str = ""
    routing: dict[str, float] | None = None


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    function_version: str | None = None
    description: str | None = None
    routing: dict[str, float] | None = None
    revision_id: str | None = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_example({"name": "reader", "scope": "read"}))
    name: str
    scope: Literal["read", "invoke", "deploy", "admin"]
    functions: str = "*"


class UrlUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_example({"auth_type": "NONE"}))
    auth_type: str = Field("NONE", json_schema_extra={"enum": list(urls.AUTH_TYPES)})
    cors: dict[str, Any] | None = None
    invoke_mode: str = Field("BUFFERED", json_schema_extra={"enum": list(urls.INVOKE_MODES)})


class UrlCreate(UrlUpdate):
    qualifier: str = "$LATEST"


class EventConfigPut(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_example({"maximum_retry_attempts": 1}))
    maximum_retry_attempts: int = Field(2, ge=0, le=2)
    maximum_event_age_seconds: int = Field(21600, le=21600)
    on_success: str | None = None
    on_failure: str | None = None


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expression: str | None = None
    timezone: str | None = None
    payload: Any = None
    enabled: bool | None = None
    catch_up: Literal["one", "none"] | None = None


class ScheduleCreate(ScheduleUpdate):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_example(
        {"name": "hourly", "expression": "rate(1 hour)"}))
    name: str
    expression: str


# --- answers ---------------------------------------------------------------------------------


class Build(_Out):
    status: str
    log: str
    seconds: float


class Function(_Out):
    """A function or version as ``GET``, create and update answer it."""

    id: str
    name: str
    description: str
    runtime: str
    handler: str
    memory_mb: int
    timeout_sec: int
    environment: dict[str, str]
    status: Literal["active", "inactive"]
    max_concurrency: int
    ephemeral_storage_mb: int
    init_once: bool
    code_sha256: str
    code_size: int
    created_at: datetime
    updated_at: datetime
    version: str
    role: str
    tags: dict[str, str]
    reserved_concurrency: int | None
    revision_id: str
    state: str
    state_reason: str | None
    state_reason_code: str | None
    last_update_status: str
    last_update_status_reason: str | None
    last_update_status_reason_code: str | None
    code: str | None = None
    code_zip: str | None = None
    build: Build | None = None


class FunctionItem(Function):
    """A function in a list: the names of its environment variables only, no code."""

    environment: list[str]  # type: ignore[assignment]


class FunctionList(_Out):
    functions: list[FunctionItem]
    count: int
    total: int
    limit: int
    offset: int


class VersionList(_Out):
    versions: list[FunctionItem]


class Deleted(_Out):
    """What a delete answers: a message and the names of what went."""

    model_config = ConfigDict(extra="allow")
    message: str


class ConcurrencyOut(_Out):
    name: str
    reserved_concurrency: int | None


class Alias(_Out):
    name: str
    function_name: str
    function_version: str
    description: str
    routing: dict[str, float]
    revision_id: str
    created_at: datetime
    updated_at: datetime


class AliasList(_Out):
    aliases: list[Alias]


class KeyCreated(_Out):
    name: str
    scope: str
    functions: str
    key: str
    access_key_id: str
    secret_access_key: str
    created_at: datetime


class Key(_Out):
    name: str
    scope: str
    functions: str
    access_key_id: str
    created_at: datetime
    revoked_at: datetime | None


class KeyList(_Out):
    keys: list[Key]


class KeyRevoked(_Out):
    name: str
    revoked_at: datetime


class AuditEntry(_Out):
    id: int
    at: datetime
    key_name: str | None
    source: str
    action: str
    target: str
    detail: Any


class AuditLog(_Out):
    entries: list[AuditEntry]
    count: int
    total: int


class UrlConfig(_Out):
    function_name: str
    qualifier: str
    url_id: str
    auth_type: str
    cors: dict[str, Any]
    invoke_mode: str
    created_at: datetime
    updated_at: datetime
    url: str


class EventConfig(_Out):
    function_name: str
    qualifier: str
    maximum_retry_attempts: int
    maximum_event_age_seconds: int
    on_success: str | None
    on_failure: str | None
    updated_at: datetime


class Schedule(_Out):
    function_name: str
    name: str
    expression: str
    timezone: str
    payload: Any
    enabled: bool
    catch_up: str
    created_at: datetime
    updated_at: datetime
    last_slot: datetime | None
    next_slot: datetime | None


class ScheduleList(_Out):
    schedules: list[Schedule]


class Attempt(_Out):
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    outcome: str | None
    error_type: str | None
    error: str | None
    result: Any
    node: str | None


class Event(_Out):
    """An asynchronous invocation."""

    request_id: str
    function_name: str
    qualifier: str
    source: str
    state: str
    attempts: int
    retries_used: int
    duplicates: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    executed_version: str | None
    error_type: str | None
    error: str | None
    result: Any
    history: list[Attempt] = []


class EventList(_Out):
    events: list[Event]
    count: int
    total: int
    pending: int


class DeadLetter(_Out):
    id: str
    request_id: str
    condition: str
    record: dict[str, Any]
    created_at: datetime


class DeadLetters(_Out):
    dead_letters: list[DeadLetter]
    count: int


class Redriven(_Out):
    request_id: str


class InvocationList(_Out):
    """Synchronous and asynchronous calls' records, newest first."""

    invocations: list[dict[str, Any]]
    count: int
    total: int


class LogEntry(_Out):
    request_id: str
    started_at: datetime
    logs: str
    truncated: bool


class Logs(_Out):
    logs: list[LogEntry]


class Node(_Out):
    """A node sharing the store, as its last heartbeat describes it."""

    model_config = ConfigDict(extra="allow")  # the figures of its last beat
    id: str
    address: str
    state: Literal["up", "down", "stopped"]
    version: str
    sandbox: str
    started_at: datetime
    heartbeat_at: datetime
    seconds_since_heartbeat: float


class NodeList(_Out):
    node: str
    heartbeat_seconds: float
    down_after_seconds: float
    nodes: list[Node]


# --- what a route declares -------------------------------------------------------------------

WHY = {
    400: "a field breaks a rule, a query parameter is out of range, or the body is not JSON",
    401: "no key, or an unknown or revoked one",
    403: "the key's scope or function pattern does not allow this",
    404: "no such function (or version, alias, key, schedule, ...)",
    409: "the name exists, or the function's state does not allow the change now",
    412: "the given revision_id is not the current one",
    413: "the body is over its limit",
    415: "the body's Content-Type is not JSON",
    503: "the server is shutting down or its database is unavailable; nothing changed",
    507: "the data directory's disk is full; nothing changed",
}
#: the answers any route under /api/v1 may give besides its own
COMMON = (400, 401, 403, 503)
WRITE = (404, 409, 413, 415, 507)


def answers(ok: type[BaseModel] | None, *errors: int, status: int = 200) -> dict[int | str, Any]:
    """``responses=`` for a route: its success answer and the error statuses it may give."""
    out: dict[int | str, Any] = {code: {"model": ErrorReply, "description": WHY[code]}
                                 for code in sorted({*COMMON, *errors})}
    if ok is not None:
        out[status] = {"model": ok, "description": "success"}
    return out


def body(model: type[BaseModel] | dict[str, Any], required: bool = True) -> dict[str, Any]:
    """``openapi_extra=`` for a route whose JSON body is described by ``model``."""
    schema = model if isinstance(model, dict) else model.model_json_schema()
    name = schema.get("title") or "Body"
    REQUEST_BODIES[name] = schema
    return {"requestBody": {"required": required, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


FUNCTION_UPDATE = _update_schema()
