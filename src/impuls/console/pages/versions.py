"""A function's versions (publish, delete) and aliases (create, point elsewhere, delete)."""

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
from impuls.platform import Platform

TAB = "versions"


def _data(p: Platform, name: str) -> dict[str, Any]:
    return {"fn": p.registry.get(name), "versions": p.registry.versions(name),
            "aliases": p.registry.list_aliases(name)}


async def render(console: Console, request: Request, session: Session, name: str, error: str = "",
                 values: dict[str, str] | None = None, status: int = 200) -> Response:
    need(session, Scope.READ, name)
    data = await blocking(_data, console.platform, name)
    return page(console, request, session, "function/versions.html", status=status, tab="versions",
                error=error, form=values or {}, **data)


async def versions_page(request: Request) -> Response:
    console, session = await enter(request)
    return await render(console, request, session, request.path_params["name"])


def _weight(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _routing(form: FormData) -> dict[str, Any] | None:
    version = forms.text(form, "routing_version").strip()
    if not version:
        return None
    return {version: _weight(forms.text(form, "routing_weight").strip())}


async def publish(p: Platform, name: str, form: FormData, who: Actor) -> str:
    fn = await blocking(p.registry.publish, name, who, forms.text(form, "description"))
    return f"version {fn.version} published"


async def delete_version(p: Platform, name: str, form: FormData, who: Actor) -> str:
    version = forms.text(form, "version")
    await blocking(p.registry.delete, name, who, version)
    return f"version {version} deleted"


async def create_alias(p: Platform, name: str, form: FormData, who: Actor) -> str:
    alias = forms.text(form, "alias").strip()
    await blocking(p.registry.create_alias, name, alias, forms.text(form, "function_version"), who,
                   forms.text(form, "description"), _routing(form))
    return f"alias {alias} created"


async def update_alias(p: Platform, name: str, form: FormData, who: Actor) -> str:
    alias = forms.text(form, "alias")
    await blocking(p.registry.update_alias, name, alias, who, forms.text(form, "function_version"), None,
                   _routing(form) or {})
    return f"alias {alias} updated"


async def delete_alias(p: Platform, name: str, form: FormData, who: Actor) -> str:
    alias = forms.text(form, "alias")
    await blocking(p.registry.delete_alias, name, alias, who)
    return f"alias {alias} deleted"


routes = [
    Route("/functions/{name}/versions", versions_page, methods=["GET"]),
    Route("/functions/{name}/versions/publish", change(publish, TAB, render), methods=["POST"]),
    Route("/functions/{name}/versions/delete", change(delete_version, TAB, render), methods=["POST"]),
    Route("/functions/{name}/aliases/create", change(create_alias, TAB, render), methods=["POST"]),
    Route("/functions/{name}/aliases/update", change(update_alias, TAB, render), methods=["POST"]),
    Route("/functions/{name}/aliases/delete", change(delete_alias, TAB, render), methods=["POST"]),
]
