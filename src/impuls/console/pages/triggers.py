"""What starts a function besides a direct call: its URL configurations and its schedules."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.auth.audit import Actor
from impuls.auth.principal import Scope
from impuls.console import forms
from impuls.console.base import Console, blocking, change, enter, page
from impuls.console.session import Session
from impuls.errors import InvalidInput
from impuls.events.scheduler import ScheduleStore
from impuls.functions.models import LATEST
from impuls.functions.urls import AUTH_TYPES, INVOKE_MODES
from impuls.platform import Platform

TAB = "triggers"


def _data(p: Platform, name: str) -> dict[str, Any]:
    return {"fn": p.registry.get(name), "urls": p.registry.list_url_configs(name),
            "aliases": [a.name for a in p.registry.list_aliases(name)],
            "schedules": ScheduleStore(p.db).list(name)}


async def render(console: Console, request: Request, session: Session, name: str, error: str = "",
                 values: dict[str, str] | None = None, status: int = 200) -> Response:
    session.principal.require(Scope.READ, name)
    data = await blocking(_data, console.platform, name)
    base = str(request.base_url).rstrip("/")
    return page(console, request, session, "function/triggers.html", status=status, tab="triggers",
                error=error, form=values or {}, base_url=base, auth_types=AUTH_TYPES,
                invoke_modes=INVOKE_MODES, **data)


async def triggers_page(request: Request) -> Response:
    console, session = await enter(request)
    return await render(console, request, session, request.path_params["name"])


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


async def put_url(p: Platform, name: str, form: FormData, who: Actor) -> str:
    qualifier = forms.text(form, "qualifier", LATEST) or LATEST
    fields: dict[str, Any] = {"auth_type": forms.text(form, "auth_type"),
                              "invoke_mode": forms.text(form, "invoke_mode") or "BUFFERED"}
    origins = _list(forms.text(form, "allow_origins"))
    methods = _list(forms.text(form, "allow_methods"))
    cors: dict[str, Any] = {}
    if origins:
        cors["allow_origins"] = origins
    if methods:
        cors["allow_methods"] = methods
    fields["cors"] = cors
    await blocking(p.registry.put_url_config, name, qualifier, fields, who)
    return f"URL configuration of {name}{'' if qualifier == LATEST else ':' + qualifier} saved"


async def delete_url(p: Platform, name: str, form: FormData, who: Actor) -> str:
    qualifier = forms.text(form, "qualifier", LATEST) or LATEST
    await blocking(p.registry.delete_url_config, name, qualifier, who)
    return "URL configuration deleted"


async def create_schedule(p: Platform, name: str, form: FormData, who: Actor) -> str:
    body: dict[str, Any] = {"name": forms.text(form, "schedule").strip(),
                            "expression": forms.text(form, "expression").strip(),
                            "timezone": forms.text(form, "timezone").strip() or "UTC",
                            "enabled": forms.text(form, "enabled") == "on",
                            "catch_up": forms.text(form, "catch_up") or "one"}
    payload = forms.text(form, "payload").strip()
    if payload:
        body["payload"] = forms.json_field(payload, "payload")
    await blocking(ScheduleStore(p.db).create, name, body, who)
    return f"schedule {body['name']} created"


async def toggle_schedule(p: Platform, name: str, form: FormData, who: Actor) -> str:
    schedule = forms.text(form, "schedule")
    enabled = forms.text(form, "enabled")
    if enabled not in ("true", "false"):
        raise InvalidInput("enabled: true or false")
    await blocking(ScheduleStore(p.db).update, name, schedule, {"enabled": enabled == "true"}, who)
    return f"schedule {schedule} {'enabled' if enabled == 'true' else 'disabled'}"


async def delete_schedule(p: Platform, name: str, form: FormData, who: Actor) -> str:
    schedule = forms.text(form, "schedule")
    await blocking(ScheduleStore(p.db).delete, name, schedule, who)
    return f"schedule {schedule} deleted"


routes = [
    Route("/functions/{name}/triggers", triggers_page, methods=["GET"]),
    Route("/functions/{name}/url", change(put_url, TAB, render), methods=["POST"]),
    Route("/functions/{name}/url/delete", change(delete_url, TAB, render), methods=["POST"]),
    Route("/functions/{name}/schedules/create", change(create_schedule, TAB, render), methods=["POST"]),
    Route("/functions/{name}/schedules/toggle", change(toggle_schedule, TAB, render), methods=["POST"]),
    Route("/functions/{name}/schedules/delete", change(delete_schedule, TAB, render), methods=["POST"]),
]
