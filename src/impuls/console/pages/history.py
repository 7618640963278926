"""A function's invocation history (filtered by outcome, a page at a time), one invocation with
everything recorded about it, and its charts: calls, errors and latency percentiles over time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.auth.principal import Scope
from impuls.console import svg
from impuls.console.base import blocking, enter, need, page
from impuls.console.pages.functions import page_number, pages
from impuls.engine import stats
from impuls.errors import EventNotFound
from impuls.events import store
from impuls.platform import Platform

PAGE_SIZE = 50
#: the charts' time ranges: (label, buckets, seconds per bucket)
RANGES = {"1h": ("last hour", 60, 60), "6h": ("last 6 hours", 72, 300), "24h": ("last 24 hours", 96, 900),
          "7d": ("last 7 days", 84, 7200)}


async def history_page(request: Request) -> Response:
    console, session = await enter(request)
    name = request.path_params["name"]
    need(session, Scope.READ, name)
    p = console.platform
    outcome = request.query_params.get("outcome", "")
    if outcome not in stats.OUTCOMES:
        outcome = ""
    number = page_number(request)
    fn = await blocking(p.registry.get, name)
    await p.recorder.flush()
    records, total = await blocking(stats.history, p.db, name, outcome or None, PAGE_SIZE,
                                    (number - 1) * PAGE_SIZE)
    return page(console, request, session, "function/history.html", tab="invocations", fn=fn,
                records=records, total=total, outcome=outcome, outcomes=stats.OUTCOMES, page=number,
                pages=pages(total, PAGE_SIZE))


def _one(p: Platform, name: str, request_id: str) -> dict[str, Any]:
    records = stats.records_of(p.db, name, request_id)
    try:
        event = store.describe(p.db, name, request_id)
    except EventNotFound:
        event = None
    return {"records": records, "event": event}


async def invocation_page(request: Request) -> Response:
    console, session = await enter(request)
    name = request.path_params["name"]
    request_id = request.path_params["request_id"]
    need(session, Scope.READ, name)
    p = console.platform
    fn = await blocking(p.registry.get, name)
    await p.recorder.flush()
    data = await blocking(_one, p, name, request_id)
    status = 200 if data["records"] or data["event"] else 404
    return page(console, request, session, "function/invocation.html", status=status, tab="invocations",
                fn=fn, request_id=request_id, **data)


async def charts_page(request: Request) -> Response:
    console, session = await enter(request)
    name = request.path_params["name"]
    need(session, Scope.READ, name)
    p = console.platform
    key = request.query_params.get("range", "1h")
    if key not in RANGES:
        key = "1h"
    label, count, width = RANGES[key]
    fn = await blocking(p.registry.get, name)
    await p.recorder.flush()
    found = await blocking(stats.series, p.db, [name], datetime.now(UTC), count, width)
    series = found[name]
    return page(console, request, session, "function/charts.html", tab="charts", fn=fn, series=series,
                range_key=key, ranges=RANGES, range_label=label,
                calls_chart=svg.bar_chart(series.buckets, width, f"calls per {width // 60} min, {label}"),
                latency_chart=svg.line_chart(series.buckets, width, stats.PERCENTILES,
                                             f"duration percentiles, {label}"),
                percentiles=stats.PERCENTILES)


routes = [
    Route("/functions/{name}/invocations", history_page, methods=["GET"]),
    Route("/functions/{name}/invocations/{request_id}", invocation_page, methods=["GET"]),
    Route("/functions/{name}/charts", charts_page, methods=["GET"]),
]
