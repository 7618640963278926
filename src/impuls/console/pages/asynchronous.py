"""Asynchronous invocation of a function: its event-invoke configurations, its recent events,
and its dead letters (redrive, delete)."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.auth.audit import Actor
from impuls.auth.principal import Scope
from impuls.console import forms
from impuls.console.base import Console, blocking, change, enter, need, page
from impuls.console.session import Session
from impuls.events import store
from impuls.functions.event_configs import DEAD_LETTERS
from impuls.functions.models import LATEST
from impuls.platform import Platform

TAB = "async"
RECENT_EVENTS = 20


def _data(p: Platform, name: str) -> dict[str, Any]:
    return {"fn": p.registry.get(name), "configs": p.registry.list_event_configs(name),
            "qualifiers": [LATEST, *(a.name for a in p.registry.list_aliases(name)),
                           *(fn.version for fn in p.registry.versions(name) if fn.version != LATEST)],
            "events": store.list_events(p.db, name, RECENT_EVENTS, 0),
            "letters": store.dead_letters_of(p.db, name)}


async def render(console: Console, request: Request, session: Session, name: str, error: str = "",
                 values: dict[str, str] | None = None, status: int = 200) -> Response:
    need(session, Scope.READ, name)
    data = await blocking(_data, console.platform, name)
    return page(console, request, session, "function/async.html", status=status, tab=TAB, error=error,
                form=values or {}, dead_letters_arn=DEAD_LETTERS, **data)


async def async_page(request: Request) -> Response:
    console, session = await enter(request)
    return await render(console, request, session, request.path_params["name"])


async def put_config(p: Platform, name: str, form: FormData, who: Actor) -> str:
    qualifier = forms.text(form, "qualifier", LATEST) or LATEST
    fields: dict[str, Any] = {
        "maximum_retry_attempts": forms.number(forms.text(form, "maximum_retry_attempts", "2")),
        "maximum_event_age_seconds": forms.number(forms.text(form, "maximum_event_age_seconds", "21600")),
        "on_success": forms.text(form, "on_success").strip() or None,
        "on_failure": forms.text(form, "on_failure").strip() or None,
    }
    await blocking(p.registry.put_event_config, name, qualifier, fields, who)
    return f"event-invoke configuration of {name}:{qualifier} saved"


async def delete_config(p: Platform, name: str, form: FormData, who: Actor) -> str:
    qualifier = forms.text(form, "qualifier", LATEST) or LATEST
    await blocking(p.registry.delete_event_config, name, qualifier, who)
    return f"event-invoke configuration of {name}:{qualifier} deleted"


async def redrive(p: Platform, name: str, form: FormData, who: Actor) -> str:
    letter = forms.text(form, "letter")
    request_id = await blocking(store.redrive, p.db, name, letter, p.events.clock())
    p.events.wake()
    return f"dead letter redriven as event {request_id}"


async def redrive_all(p: Platform, name: str, form: FormData, who: Actor) -> str:
    letters = await blocking(store.dead_letters_of, p.db, name)
    for letter in letters:
        await blocking(store.redrive, p.db, name, letter["id"], p.events.clock())
    p.events.wake()
    return f"{len(letters)} dead letters redriven"


async def delete_letter(p: Platform, name: str, form: FormData, who: Actor) -> str:
    await blocking(store.delete_dead_letter, p.db, name, forms.text(form, "letter"))
    return "dead letter deleted"


routes = [
    Route("/functions/{name}/async", async_page, methods=["GET"]),
    Route("/functions/{name}/event-config", change(put_config, TAB, render), methods=["POST"]),
    Route("/functions/{name}/event-config/delete", change(delete_config, TAB, render), methods=["POST"]),
    Route("/functions/{name}/dead-letters/redrive", change(redrive, TAB, render), methods=["POST"]),
    Route("/functions/{name}/dead-letters/redrive-all", change(redrive_all, TAB, render), methods=["POST"]),
    Route("/functions/{name}/dead-letters/delete", change(delete_letter, TAB, render), methods=["POST"]),
]
