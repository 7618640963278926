"""From HTML forms to the bodies the registry takes: every field is a string in a form, so
whole numbers become numbers and everything else is passed on as it is -- the registry then
says what is wrong in the same words as the API."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from impuls.errors import InvalidInput, PayloadTooLarge

#: a form of plain fields (the code editor's source included)
MAX_FORM = 8 * 1024 * 1024
#: a zip upload: the package's limit and room for the other fields
MAX_UPLOAD = 50 * 1024 * 1024 + 1024 * 1024
INT_FIELDS = ("memory_mb", "timeout_sec", "max_concurrency", "ephemeral_storage_mb")
TEXT_FIELDS = ("description", "runtime", "handler", "status")


async def read_form(request: Request, limit: int = MAX_FORM) -> FormData:
    """The posted form (URL-encoded or multipart), refused with 413 over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        raise InvalidInput("body: a form with a Content-Length is required")
    if int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit} byte limit")
    return await request.form(max_files=1, max_fields=200, max_part_size=limit)


def text(form: FormData, name: str, default: str = "") -> str:
    value = form.get(name, default)
    return value if isinstance(value, str) else default


def number(value: str) -> int | str:
    """``"256"`` as 256; anything else stays a string (the registry names the rule it breaks)."""
    stripped = value.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    return stripped


def environment(value: str) -> dict[str, str]:
    """``KEY=value`` lines (blank lines and ``#`` comments ignored) as a mapping."""
    env: dict[str, str] = {}
    for number_, line in enumerate(value.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, val = line.partition("=")
        if not sep:
            raise InvalidInput(f"environment: line {number_}: write KEY=value")
        env[key.strip()] = val
    return env


def environment_text(env: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in env.items())


def config_body(form: FormData) -> dict[str, Any]:
    """The configuration fields a function form posts, as an API body."""
    body: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if name in form:
            body[name] = text(form, name).strip()
    for name in INT_FIELDS:
        if name in form:
            body[name] = number(text(form, name))
    if "environment" in form:
        body["environment"] = environment(text(form, "environment"))
    return body


async def zip_field(form: FormData, name: str = "zip") -> bytes | None:
    """The bytes of an uploaded file (None when no file was chosen)."""
    upload = form.get(name)
    if not isinstance(upload, UploadFile) or not upload.filename:
        return None
    return await upload.read()


def json_field(value: str, what: str) -> Any:
    """A JSON value typed into a form (InvalidInput like the API's for a body that is not JSON)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{what}: not valid JSON ({exc})") from exc


def values(form: FormData) -> dict[str, str]:
    """What was typed, to show the form again after an error."""
    return {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf"}
