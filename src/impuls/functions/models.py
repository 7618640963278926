"""Functions: the fields a user may set, their rules, and the stored record.

:func:`validate_config` is the single validation path for create *and*
update: an update is merged onto the stored function and the result is
checked exactly like a new one.  Every rule violation is an
:class:`~impuls.errors.InvalidInput` whose message names the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import stat
import zipfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from impuls.errors import InvalidInput
from impuls.runtimes import Runtime, RuntimeRegistry

MAX_ZIP_BYTES = 50 * 1024 * 1024
MAX_UNZIPPED_BYTES = 250 * 1024 * 1024
MAX_ZIP_FILES = 10_000
MAX_ENV_BYTES = 4096
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = ("_HANDLER", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR")
#: Lambda's identity of a function: ARNs name this region and account
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "000000000000"
READ_ONLY_FIELDS = ("id", "code_sha256", "code_size", "created_at", "updated_at", "revision", "version",
                    "runtime_given", "revision_id", "reserved_concurrency", "state", "state_reason",
                    "state_reason_code", "last_update_status", "last_update_status_reason",
                    "last_update_status_reason_code")
CODE_FIELDS = ("code", "code_zip")
#: the qualifier of the function's unpublished, editable version
LATEST = "$LATEST"
#: Lambda's lifecycle: ``state`` of the function, ``last_update_status`` of its last change
PENDING, ACTIVE, FAILED = "Pending", "Active", "Failed"
IN_PROGRESS, SUCCESSFUL = "InProgress", "Successful"
ROLE_RE = re.compile(r"^arn:(aws[a-zA-Z-]*)?:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
MAX_ROLE = 2048
MAX_TAGS = 50


class FunctionConfig(BaseModel):
    """Everything a user sets on a function, with its rules (code apart)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=256)
    runtime: str
    handler: str = Field(min_length=1, max_length=256)
    memory_mb: int = Field(default=128, ge=128, le=10240)
    timeout_sec: int = Field(default=30, ge=1, le=900)
    environment: dict[str, str] = Field(default_factory=dict)
    status: Literal["active", "inactive"] = "active"
    max_concurrency: int = Field(default=10, ge=1, le=1000)
    ephemeral_storage_mb: int = Field(default=512, ge=512, le=10240)
    #: run the init once per version and fork instances from it (docs/init-once.md);
    #: false for code whose import state cannot be shared (connections opened at import)
    init_once: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must match ^[A-Za-z0-9][A-Za-z0-9_-]*$")
        return value

    @field_validator("environment")
    @classmethod
    def _environment(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not ENV_KEY_RE.match(key):
                raise ValueError(f"key {key!r} must match ^[A-Za-z_][A-Za-z0-9_]*$")
            if key.startswith("AWS_LAMBDA_") or key in RESERVED_ENV:
                raise ValueError(f"key {key!r} is reserved by the runtime interface")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
        if size > MAX_ENV_BYTES:
            raise ValueError(f"total size {size} bytes exceeds {MAX_ENV_BYTES} bytes")
        return env


@dataclass(frozen=True)
class Code:
    """A function's code as uploaded: one source file or a zip archive."""

    kind: Literal["source", "zip"]
    data: bytes

    def api_fields(self) -> dict[str, str]:
        if self.kind == "source":
            return {"code": self.data.decode("utf-8")}
        return {"code_zip": base64.b64encode(self.data).decode("ascii")}


@dataclass(frozen=True)
class ValidConfig:
    """A checked configuration: the user's fields, the runtime they name, the runtime's name
    as written (``nodejs20.x``; ``config.runtime`` is the canonical id) and the role."""

    config: FunctionConfig
    runtime: Runtime
    runtime_given: str
    role: str

    def snapshot(self) -> dict[str, Any]:
        """What a version freezes and a pending update carries (JSON-ready)."""
        return {**self.config.model_dump(), "role": self.role, "runtime_given": self.runtime_given}


@dataclass(frozen=True)
class Function:
    """A stored function: ``$LATEST`` (one row of ``functions``) or a published version
    (``version`` "1", "2", ...: a row of ``function_versions`` with its function's
    id, tags and reserved concurrency).

    ``pending*`` describe an update being built in the background (``last_update_status``
    InProgress); the fields above them are what is served until it succeeds.
    """

    id: str
    name: str
    description: str
    runtime: str
    handler: str
    code_sha256: str
    code_size: int
    code_kind: Literal["source", "zip"]
    memory_mb: int
    timeout_sec: int
    environment: dict[str, str]
    status: str
    max_concurrency: int
    ephemeral_storage_mb: int
    revision: int
    created_at: datetime
    updated_at: datetime
    version: str = LATEST
    role: str = ""
    runtime_given: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    reserved_concurrency: int | None = None
    revision_id: str = ""
    init_once: bool = True
    state: str = ACTIVE
    state_reason: str | None = None
    state_reason_code: str | None = None
    last_update_status: str = SUCCESSFUL
    last_update_status_reason: str | None = None
    last_update_status_reason_code: str | None = None
    pending: dict[str, Any] | None = None
    pending_code_sha256: str | None = None
    pending_code_size: int | None = None
    pending_code_kind: Literal["source", "zip"] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FunctionConfig.model_fields}

    def snapshot(self) -> dict[str, Any]:
        """The configuration a version freezes (see :meth:`ValidConfig.snapshot`)."""
        return {**self.config(), "role": self.role, "runtime_given": self.runtime_given}

    @property
    def concurrency_limit(self) -> int:
        """Instances at once: the reserved concurrency when set, else ``max_concurrency``."""
        return self.reserved_concurrency if self.reserved_concurrency is not None else self.max_concurrency

    def as_pending(self) -> Function:
        """The function as it will be once its pending update is built (itself when none):
        what Lambda's answers show while ``last_update_status`` is InProgress."""
        if self.pending is None or self.pending_code_sha256 is None:
            return self
        fields = {k: v for k, v in self.pending.items() if k in FunctionConfig.model_fields
                  or k in ("role", "runtime_given")}
        return replace(self, **fields, code_sha256=self.pending_code_sha256,
                       code_size=self.pending_code_size or 0,
                       code_kind=self.pending_code_kind or self.code_kind)

    def to_api(self, code: Code | None = None, *, list_item: bool = False) -> dict[str, Any]:
        """The API representation; list items carry environment keys only, never values."""
        out: dict[str, Any] = {
            "id": self.id,
            **self.config(),
            "code_sha256": self.code_sha256,
            "code_size": self.code_size,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "version": self.version,
            "role": self.role,
            "tags": dict(self.tags),
            "reserved_concurrency": self.reserved_concurrency,
            "revision_id": self.revision_id,
            "state": self.state,
            "state_reason": self.state_reason,
            "state_reason_code": self.state_reason_code,
            "last_update_status": self.last_update_status,
            "last_update_status_reason": self.last_update_status_reason,
            "last_update_status_reason_code": self.last_update_status_reason_code,
        }
        if list_item:
            out["environment"] = sorted(self.environment)
        if code is not None:
            out.update(code.api_fields())
        return out


def function_arn(name: str, qualifier: str | None = None, region: str = DEFAULT_REGION,
                 account: str = DEFAULT_ACCOUNT) -> str:
    """``arn:aws:lambda:<region>:<account>:function:<name>[:<qualifier>]``."""
    arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn


def rfc3339(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _format_pydantic(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def validate_config(data: dict[str, Any], registry: RuntimeRegistry) -> tuple[FunctionConfig, Runtime]:
    """Check a complete configuration; the runtime alias is normalised to its id."""
    try:
        cfg = FunctionConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_format_pydantic(exc)) from exc
    runtime = registry.resolve(cfg.runtime)
    runtime.check_handler(cfg.handler)
    return cfg.model_copy(update={"runtime": runtime.id}), runtime


def validate_function(data: dict[str, Any], registry: RuntimeRegistry,
                      runtime_given: str | None = None) -> ValidConfig:
    """:func:`validate_config` plus the fields outside :class:`FunctionConfig` (``role``);
    ``runtime_given`` defaults to the runtime as named in ``data``."""
    data = dict(data)
    role = data.pop("role", "")
    if not isinstance(role, str) or len(role) > MAX_ROLE or (role and not ROLE_RE.match(role)):
        raise InvalidInput("role: must be an IAM role ARN (arn:aws:iam::<12 digits>:role/<name>) "
                           f"of at most {MAX_ROLE} characters")
    cfg, runtime = validate_config(data, registry)
    given = runtime_given if runtime_given is not None else data["runtime"]
    return ValidConfig(cfg, runtime, given, role)


def validate_tags(tags: Any, field_name: str = "tags") -> dict[str, str]:
    """Lambda's tag rules: string keys of 1-128 characters (not ``aws:...``), string values of
    at most 256."""
    if not isinstance(tags, dict):
        raise InvalidInput(f"{field_name}: must be an object of tag names and values")
    for key, value in tags.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            raise InvalidInput(f"{field_name}: tag name {key!r} must be 1-128 characters")
        if key.lower().startswith("aws:"):
            raise InvalidInput(f"{field_name}: tag name {key!r}: the prefix 'aws:' is reserved")
        if not isinstance(value, str) or len(value) > 256:
            raise InvalidInput(f"{field_name}: the value of tag {key!r} must be a string of at most "
                               "256 characters")
    if len(tags) > MAX_TAGS:
        raise InvalidInput(f"{field_name}: at most {MAX_TAGS} tags per function")
    return dict(tags)


def split_request(body: Any) -> tuple[dict[str, Any], Code | None]:
    """Separate a create/update body into config fields and the decoded code.

    Rejects read-only fields, more than one code field and malformed code.
    """
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    for name in READ_ONLY_FIELDS:
        if name in body:
            raise InvalidInput(f"{name}: read-only field, remove it from the request")
    given = [f for f in CODE_FIELDS if body.get(f) is not None]
    if len(given) > 1:
        raise InvalidInput("code: give exactly one of 'code' or 'code_zip', not both")
    config = {k: v for k, v in body.items() if k not in CODE_FIELDS}
    if not given:
        return config, None
    value = body[given[0]]
    if not isinstance(value, str):
        raise InvalidInput(f"{given[0]}: must be a string")
    if given[0] == "code":
        data = value.encode("utf-8")
        if len(data) > MAX_ZIP_BYTES:
            raise InvalidInput(f"code: {len(data)} bytes exceeds the {MAX_ZIP_BYTES} byte limit")
        return config, Code("source", data)
    return config, Code("zip", decode_zip(value))


def decode_zip(b64: str) -> bytes:
    """Decode and check a base64 zip: size, file count, no entry escaping the root."""
    if len(b64) > (MAX_ZIP_BYTES * 4) // 3 + 4:
        raise InvalidInput(f"code_zip: archive exceeds the {MAX_ZIP_BYTES} byte limit")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("code_zip: not valid base64") from exc
    if len(data) > MAX_ZIP_BYTES:
        raise InvalidInput(f"code_zip: archive exceeds the {MAX_ZIP_BYTES} byte limit")
    check_zip(data)
    return data


def check_zip(data: bytes) -> list[zipfile.ZipInfo]:
    """Validate a zip archive and return its entries.

    An entry with an absolute path, a ``..`` component or a symlink mode is
    rejected, and so are archives over the file-count or unzipped-size limit.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise InvalidInput(f"code_zip: not a valid zip archive ({exc})") from exc
    if len(entries) > MAX_ZIP_FILES:
        raise InvalidInput(f"code_zip: {len(entries)} entries exceeds the {MAX_ZIP_FILES} file limit")
    total = 0
    for info in entries:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise InvalidInput(f"code_zip: entry {name!r} escapes the package root")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidInput(f"code_zip: entry {name!r} is a symlink; symlinks are not allowed")
        total += info.file_size
    if total > MAX_UNZIPPED_BYTES:
        raise InvalidInput(
            f"code_zip: unzipped size {total} bytes exceeds the {MAX_UNZIPPED_BYTES} byte limit"
        )
    return entries
