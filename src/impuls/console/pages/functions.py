"""The function list (search, pages, the last hour in numbers and sparklines), a new function,
and a function's overview: configuration, code (view, editor, zip upload), build, deletion."""

from __future__ import annotations

import base64
import io
import math
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.auth.principal import Principal, Scope
from impuls.console import forms
from impuls.console.base import Console, actor, blocking, enter, enter_post, failed, need, page
from impuls.console.highlight import language_of
from impuls.console.render import redirect
from impuls.console.session import Session
from impuls.engine import stats
from impuls.errors import ImpulsError, InvalidInput
from impuls.functions.models import Function
from impuls.platform import Platform
from impuls.store.db import MAX_INT

PAGE_SIZE = 50
#: the zip view shows this many entries, and the handler's file up to this size
ZIP_ENTRIES = 200
ZIP_FILE_VIEW = 256 * 1024

SAMPLES = {
    "python3.11": ("handler.handler",
                   'import json\n\n\ndef handler(event, context):\n'
                   '    print("event:", json.dumps(event))\n'
                   '    return {"message": "Hello " + str(event.get("name", "World"))}\n'),
    "nodejs20": ("index.handler",
                 "exports.handler = async (event) => {\n"
                 "  console.log('event:', JSON.stringify(event));\n"
                 "  return { message: 'Hello ' + (event.name || 'World') };\n};\n"),
}


def page_number(request: Request) -> int:
    """The ``page`` asked for: 1 unless it is a number, at most the last a database can page to."""
    raw = request.query_params.get("page", "1")
    return min(max(int(raw), 1), MAX_INT // PAGE_SIZE) if raw.isascii() and raw.isdigit() else 1


def pages(total: int, size: int = PAGE_SIZE) -> int:
    return max(math.ceil(total / size), 1)


# --- the list ----------------------------------------------------------------------------------


def _list(p: Platform, who: Principal, search: str, number: int) -> dict[str, Any]:
    items, total = p.registry.list(PAGE_SIZE, (number - 1) * PAGE_SIZE, who.functions, search)
    hour = stats.series(p.db, [fn.name for fn in items], datetime.now(UTC), 60, 60)
    return {"functions": items, "total": total, "series": hour}


async def function_list(request: Request) -> Response:
    console, session = await enter(request)
    who = need(session, Scope.READ)
    search = request.query_params.get("q", "").strip()[:64]
    number = page_number(request)
    await console.platform.recorder.flush()
    data = await blocking(_list, console.platform, who, search, number)
    return page(console, request, session, "functions.html", q=search, page=number,
                pages=pages(data["total"]), **data)


# --- a new function ----------------------------------------------------------------------------


def _runtimes(p: Platform) -> list[str]:
    return [rt.id for rt in p.registry.runtimes.available()]


def _new_page(console: Console, request: Request, session: Session, values: dict[str, str] | None = None,
              error: str = "", status: int = 200) -> Response:
    runtimes = _runtimes(console.platform)
    first = "python3.11" if "python3.11" in runtimes else (runtimes[0] if runtimes else "")
    handler, code = SAMPLES.get(first, ("", ""))
    defaults = {"name": "", "runtime": first, "handler": handler, "code": code, "description": "",
                "memory_mb": "128", "timeout_sec": "30", "environment": ""}
    return page(console, request, session, "new.html", status=status, runtimes=runtimes,
                samples=SAMPLES, form={**defaults, **(values or {})}, error=error)


async def new_form(request: Request) -> Response:
    console, session = await enter(request)
    need(session, Scope.DEPLOY)
    return _new_page(console, request, session)


async def create(request: Request) -> Response:
    console, session, form = await enter_post(request, forms.MAX_UPLOAD)
    who = need(session, Scope.DEPLOY)
    body = {"name": forms.text(form, "name").strip()}
    try:
        body.update(forms.config_body(form))
        who.require(Scope.DEPLOY, body["name"] or None)
        data = await forms.zip_field(form)
        if data is not None:
            body["code_zip"] = base64.b64encode(data).decode()
        else:
            body["code"] = forms.text(form, "code")
        await blocking(console.platform.registry.create, body, actor(request, who))
    except ImpulsError as exc:
        return _new_page(console, request, session, forms.values(form), exc.message, failed(exc))
    session.flash.append(("saved", f"function {body['name']} created"))
    return redirect(f"/functions/{body['name']}")


# --- a function's overview ---------------------------------------------------------------------


@dataclass
class CodeView:
    kind: str
    filename: str
    language: str
    source: str | None
    entries: list[tuple[str, int]]
    more_entries: int


def code_view(p: Platform, fn: Function) -> CodeView:
    """What the code view shows: the single file, or the zip's entries and its handler's file."""
    code = p.registry.code(fn)
    try:
        runtime = p.registry.runtime(fn)
        filename = runtime.code_filename(fn.handler)
        modules = [runtime.check_handler(fn.handler) + ext for ext in runtime.module_extensions]
    except ImpulsError:
        filename, modules = "", []
    if code.kind == "source":
        return CodeView("source", filename, language_of(filename), code.data.decode("utf-8", "replace"),
                        [], 0)
    with zipfile.ZipFile(io.BytesIO(code.data)) as archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        entries = [(i.filename, i.file_size) for i in infos[:ZIP_ENTRIES]]
        shown = next((i for i in infos if i.filename in modules), None)
        source = None
        if shown is not None and shown.file_size <= ZIP_FILE_VIEW:
            source = archive.read(shown).decode("utf-8", "replace")
            filename = shown.filename
    return CodeView("zip", filename, language_of(filename), source, entries, max(len(infos) - ZIP_ENTRIES, 0))


def overview_data(p: Platform, name: str) -> dict[str, Any]:
    fn = p.registry.get(name)
    hour = stats.series(p.db, [name], datetime.now(UTC), 60, 60)[name]
    try:
        build = p.registry.build_info(fn)
    except ImpulsError as exc:
        build = {"status": "unavailable", "log": exc.message, "seconds": 0}
    return {"fn": fn, "code": code_view(p, fn), "build": build, "runtimes": _runtimes(p), "hour": hour}


def config_values(fn: Function) -> dict[str, str]:
    return {"description": fn.description, "runtime": fn.runtime, "handler": fn.handler,
            "memory_mb": str(fn.memory_mb), "timeout_sec": str(fn.timeout_sec),
            "max_concurrency": str(fn.max_concurrency), "ephemeral_storage_mb": str(fn.ephemeral_storage_mb),
            "status": fn.status, "environment": forms.environment_text(fn.environment)}


async def render_overview(console: Console, request: Request, session: Session, name: str,
                          values: dict[str, str] | None = None, error: str = "", error_at: str = "",
                          status: int = 200) -> Response:
    need(session, Scope.READ, name)
    await console.platform.recorder.flush()
    data = await blocking(overview_data, console.platform, name)
    form = {**config_values(data["fn"]), "code": data["code"].source or ""}
    if values:
        form.update(values)
    return page(console, request, session, "function/overview.html", status=status, tab="overview",
                form=form, error=error, error_at=error_at, **data)


async def overview(request: Request) -> Response:
    console, session = await enter(request)
    return await render_overview(console, request, session, request.path_params["name"])


async def _update(request: Request, what: str, body_of: Any, limit: int = forms.MAX_FORM) -> Response:
    """Apply the update ``body_of(form)`` makes; the overview again with the error on failure."""
    console, session, form = await enter_post(request, limit)
    name = request.path_params["name"]
    who = need(session, Scope.DEPLOY, name)
    try:
        body = await body_of(form)
        await blocking(console.platform.registry.update, name, body, actor(request, who))
    except ImpulsError as exc:
        return await render_overview(console, request, session, name, forms.values(form), exc.message, what,
                                     failed(exc))
    session.flash.append(("saved", f"{what} of {name} saved"))
    return redirect(f"/functions/{name}")


async def update_config(request: Request) -> Response:
    async def body(form: Any) -> dict[str, Any]:
        return forms.config_body(form)

    return await _update(request, "configuration", body)


async def update_code(request: Request) -> Response:
    async def body(form: Any) -> dict[str, Any]:
        return {"code": forms.text(form, "code")}

    return await _update(request, "code", body)


async def upload_zip(request: Request) -> Response:
    async def body(form: Any) -> dict[str, Any]:
        data = await forms.zip_field(form)
        if data is None:
            raise InvalidInput("code_zip: choose a zip file to upload")
        return {"code_zip": base64.b64encode(data).decode()}

    return await _update(request, "package", body, forms.MAX_UPLOAD)


async def delete(request: Request) -> Response:
    console, session, _ = await enter_post(request)
    name = request.path_params["name"]
    who = need(session, Scope.DEPLOY, name)
    await blocking(console.platform.registry.delete, name, actor(request, who))
    session.flash.append(("saved", f"function {name} deleted"))
    return redirect("/functions")


routes = [
    Route("/functions", function_list, methods=["GET"]),
    Route("/new", new_form, methods=["GET"]),  # not under /functions/: "new" is a valid name
    Route("/new", create, methods=["POST"]),
    Route("/functions/{name}", overview, methods=["GET"]),
    Route("/functions/{name}/config", update_config, methods=["POST"]),
    Route("/functions/{name}/code", update_code, methods=["POST"]),
    Route("/functions/{name}/zip", upload_zip, methods=["POST"]),
    Route("/functions/{name}/delete", delete, methods=["POST"]),
]
