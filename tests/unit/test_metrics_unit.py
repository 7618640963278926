"""The metrics in process: the record listener, per-platform registries, route templates."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from impuls.api.metrics import HttpMetrics
from impuls.engine.records import InvocationRecord, InvocationRecorder
from impuls.metrics import Metrics


def record(function: str = "fn", outcome: str = "success", ms: float = 0.3,
           cold: bool = False) -> InvocationRecord:
    return InvocationRecord("rid", function, "id", datetime.now(UTC), ms, outcome, None, cold, "process",
                            "", False)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_failing_listener_never_fails_the_recorded_call(tmp_path: Path) -> None:
    recorder = InvocationRecorder(create_engine(f"sqlite:///{tmp_path / 'x.db'}"), timedelta(days=1))
    seen: list[InvocationRecord] = []

    def broken(_: InvocationRecord) -> None:
        raise RuntimeError("listener bug")

    recorder.listen(broken)
    recorder.listen(seen.append)
    recorder.add(record())
    assert len(seen) == 1 and len(recorder._pending) == 1


def test_registries_are_per_platform_and_count_records() -> None:
    one, two = Metrics(), Metrics()
    one.record(record(ms=0.2))
    one.record(record(outcome="error", ms=2.0, cold=True))
    one.throttled("fn")
    got = samples(one)
    assert got[("impuls_invocations_total", (("function", "fn"), ("outcome", "success")))] == 1
    assert got[("impuls_invocations_total", (("function", "fn"), ("outcome", "error")))] == 1
    assert got[("impuls_invocation_duration_seconds_bucket", (("function", "fn"), ("le", "0.00025")))] == 1
    assert got[("impuls_invocation_duration_seconds_count", (("function", "fn"),))] == 2
    assert got[("impuls_cold_starts_total", (("function", "fn"),))] == 1
    assert got[("impuls_throttles_total", (("function", "fn"),))] == 1
    assert not any(name.startswith("impuls_invocations") for name, _ in samples(two))


def test_a_deleted_function_s_series_go_and_come_back_from_zero() -> None:
    metrics = Metrics()
    metrics.record(record("gone"))
    metrics.throttled("gone")
    metrics.record(record("kept"))
    metrics.function_changed("gone", "$LATEST")  # a change, not a deletion
    assert any(dict(labels).get("function") == "gone" for _, labels in samples(metrics))
    metrics.function_changed("gone", None)
    left = samples(metrics)
    assert not any(dict(labels).get("function") == "gone" for _, labels in left)
    assert left[("impuls_invocations_total", (("function", "kept"), ("outcome", "success")))] == 1
    metrics.record(record("gone"))
    assert samples(metrics)[("impuls_invocations_total", (("function", "gone"), ("outcome", "success")))] == 1


class _Route:
    path = "/api/v1/functions/{name}"


def _answer(status: int, route: Any = None) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if route is not None:
            scope["route"] = route  # as FastAPI's router does
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    return app


def _request(app: Any, path: str, method: str = "GET", query: bytes = b"") -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(_: dict[str, Any]) -> None:
        return None

    scope = {"type": "http", "path": path, "raw_path": path.encode(), "method": method, "query_string": query,
             "headers": []}
    asyncio.run(app(scope, receive, send))


def test_http_requests_are_labelled_by_bounded_templates() -> None:
    metrics = Metrics()

    def url_target(scope: dict[str, Any]) -> object | None:
        return object() if scope["path"].startswith("/fn/") else None

    def counted(status: int, route: Any = None) -> HttpMetrics:
        return HttpMetrics(_answer(status, route), metrics, url_target)

    _request(counted(200), "/api/v1/functions/abc/invoke", "POST")
    _request(counted(200), "/api/v1/functions/abc:prod/invoke", "POST")
    _request(counted(404, _Route()), "/api/v1/functions/abc")
    _request(counted(404), "/api/v1/nothing/here")
    _request(counted(200), "/fn/abc/some/path")
    _request(counted(200), "/2015-03-31/functions/abc/invocations", "POST")
    _request(counted(200), "/2015-03-31/functions/abc/invocations", "POST", b"Qualifier=1")
    _request(counted(404), "/2015-03-31/no-such-operation")
    _request(counted(200), "/console/functions/abc")
    got = {dict(labels)["route"] + " " + dict(labels)["status"]: value
           for (name, labels), value in samples(metrics).items() if name == "impuls_http_requests_total"}
    assert got == {"/api/v1/functions/{name}/invoke 200": 2, "/api/v1/functions/{name} 404": 1,
                   "other 404": 1, "url 200": 1, "lambda:Invoke 200": 2, "lambda:unknown 404": 1,
                   "console 200": 1}


def test_an_app_that_raises_is_counted_as_500() -> None:
    metrics = Metrics()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        _request(HttpMetrics(broken, metrics, lambda s: None), "/health")
    assert samples(metrics)[("impuls_http_requests_total", (("route", "other"), ("status", "500")))] == 1
