"""``GET /metrics`` (Prometheus' text format) and ``--log-format json``, through real servers.

Every value is read back by parsing the exposition with prometheus_client's own parser, after
calls whose effect is known.  Functions get unique names, so the counts of one test are not
disturbed by another on the shared server; the HTTP request counter is shared by all, so its
tests compare before and after.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from impuls.server import JsonFormatter
from tests.event_fixtures import (
    DEAD_LETTERS,
    EVENT_ENV,
    FAIL,
    SLEEP,
    deploy,
    poll,
    put_config,
    send,
    set_reserved,
    wait_event,
)
from tests.helpers import Server, make_zip, unique

#: succeeds, or raises when the event says so
MAYBE_FAIL = """
def handler(event, context):
    if event.get("fail"):
        raise ValueError("failing on purpose")
    return {"ok": True}
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, new_store: Any) -> Iterator[Server]:
    """One server per store (SQLite, PostgreSQL), with short event retry delays."""
    server = Server(tmp_path_factory.mktemp("metrics") / "data", env={**new_store(), **EVENT_ENV}).start()
    yield server
    server.stop()


class Scrape:
    """One parsed answer of ``/metrics``: every sample by name, with its labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the one sample ``name`` whose labels include ``labels`` (None: none)."""
        found = [v for ls, v in self.samples.get(name, []) if labels.items() <= ls.items()]
        assert len(found) <= 1, f"{name} {labels}: {len(found)} samples"
        return found[0] if found else None

    def value(self, name: str, **labels: str) -> float:
        """Like :meth:`get`, 0 when there is no such sample (a counter never incremented)."""
        return self.get(name, **labels) or 0.0

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample ``name`` whose labels include ``labels``."""
        return sum(v for ls, v in self.samples.get(name, []) if labels.items() <= ls.items())

    def labels(self, name: str, label: str) -> set[str]:
        return {ls[label] for ls, _ in self.samples.get(name, []) if label in ls}


def scrape(server: Server, client: httpx.Client | None = None) -> Scrape:
    r = (client or server.client).get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return Scrape(r.text)


def invoke_ok(server: Server, name: str, event: Any = None) -> dict[str, Any]:
    r = server.invoke(name, event if event is not None else {})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sandbox_of(server: Server) -> str:
    return str(server.request("GET", "/health").json()["sandbox"])


# --- invocations ------------------------------------------------------------------------


def test_invocations_by_outcome_durations_and_one_cold_start(srv: Server) -> None:
    name = deploy(srv, MAYBE_FAIL, prefix="met")
    before = scrape(srv)
    assert before.get("impuls_invocations_total", function=name, outcome="success") is None
    for _ in range(3):
        assert invoke_ok(srv, name)["status_code"] == 200
    for _ in range(2):
        assert invoke_ok(srv, name, {"fail": True})["status_code"] == 500

    after = scrape(srv)
    assert after.types["impuls_invocations"] == "counter"
    assert after.value("impuls_invocations_total", function=name, outcome="success") == 3
    assert after.value("impuls_invocations_total", function=name, outcome="error") == 2
    assert after.total("impuls_invocations_total", function=name) == 5
    assert after.types["impuls_invocation_duration_seconds"] == "histogram"
    assert after.value("impuls_invocation_duration_seconds_count", function=name) == 5
    assert after.value("impuls_invocation_duration_seconds_bucket", function=name, le="+Inf") == 5
    assert after.value("impuls_invocation_duration_seconds_sum", function=name) > 0
    # sub-millisecond buckets exist for warm calls
    buckets = {ls["le"] for ls, _ in after.samples["impuls_invocation_duration_seconds_bucket"]
               if ls["function"] == name}
    assert "0.0001" in buckets and "60.0" in buckets, buckets
    # sequential calls: one instance, started once
    assert after.value("impuls_cold_starts_total", function=name) == 1
    assert after.value("impuls_cold_start_duration_seconds_count", function=name) == 1
    assert after.value("impuls_cold_start_duration_seconds_sum", function=name) > 0


def test_instance_gauges_show_a_warm_instance_busy_then_idle(srv: Server) -> None:
    name = deploy(srv, SLEEP, prefix="met")
    sandbox = sandbox_of(srv)
    invoke_ok(srv, name)  # warm: one idle instance
    idle_before = scrape(srv).value("impuls_instances", sandbox=sandbox, state="idle")
    assert idle_before >= 1

    done = threading.Event()
    holder: dict[str, Any] = {}

    def slow_call() -> None:
        holder["response"] = srv.invoke(name, {"sleep": 3})
        done.set()

    caller = threading.Thread(target=slow_call)
    caller.start()
    try:
        during = poll(lambda: scrape(srv), lambda s: s.value("impuls_invocations_in_flight") >= 1,
                      timeout=30, interval=0.05, what="a call in flight")
        assert during.value("impuls_instances", sandbox=sandbox, state="busy") >= 1
    finally:
        caller.join(60)
    assert done.is_set() and holder["response"].status_code == 200
    after = scrape(srv)
    assert after.value("impuls_instances", sandbox=sandbox, state="idle") >= 1
    assert after.types["impuls_instances"] == "gauge"
    assert after.value("impuls_cold_starts_total", function=name) == 1  # the slow call was warm


def test_a_throttled_call_is_counted(srv: Server) -> None:
    name = deploy(srv, MAYBE_FAIL, prefix="met")
    set_reserved(srv, name, 0)
    route = "/api/v1/functions/{name}/invoke"
    before = scrape(srv)
    for _ in range(2):
        r = srv.invoke(name, {})
        assert r.status_code == 429, r.text
    after = scrape(srv)
    assert after.value("impuls_throttles_total", function=name) == 2
    assert (after.value("impuls_http_requests_total", route=route, status="429")
            - before.value("impuls_http_requests_total", route=route, status="429")) >= 2
    assert after.get("impuls_invocations_total", function=name, outcome="success") is None


def test_a_waiting_async_event_raises_the_queue_gauges(srv: Server) -> None:
    name = deploy(srv, MAYBE_FAIL, prefix="met")
    set_reserved(srv, name, 0)  # every delivery is throttled: the event waits, retrying
    request_id = send(srv, name, {"n": 1})
    waiting = poll(lambda: scrape(srv),
                   lambda s: (s.total("impuls_async_queue_depth") >= 1
                              and s.value("impuls_async_queue_oldest_age_seconds") >= 1
                              and s.value("impuls_throttles_total", function=name) >= 1),
                   timeout=60, what="the throttled event in the queue gauges")
    assert waiting.types["impuls_async_queue_depth"] == "gauge"
    assert waiting.labels("impuls_async_queue_depth", "state") == {"queued", "running", "retrying"}
    set_reserved(srv, name, None)  # lifted: the event is delivered and leaves the queue
    wait_event(srv, name, request_id, {"succeeded"})
    drained = poll(lambda: scrape(srv),
                   lambda s: s.value("impuls_invocations_total", function=name, outcome="success") == 1,
                   timeout=30, what="the delivery counted")
    assert drained.value("impuls_cold_starts_total", function=name) == 1


def test_dead_letters_by_function(srv: Server) -> None:
    name = deploy(srv, FAIL, prefix="met")
    put_config(srv, name, maximum_retry_attempts=0, on_failure=DEAD_LETTERS)
    assert scrape(srv).get("impuls_async_dead_letters", function=name) is None
    request_id = send(srv, name, {"n": 1})
    wait_event(srv, name, request_id, {"failed"})
    letters = poll(lambda: scrape(srv), lambda s: s.value("impuls_async_dead_letters", function=name) == 1,
                   timeout=30, what="one dead letter")
    assert letters.value("impuls_invocations_total", function=name, outcome="error") == 1
    r = srv.request("GET", f"/api/v1/functions/{name}/dead-letters")
    letter = r.json()["dead_letters"][0]["id"]
    assert srv.request("DELETE", f"/api/v1/functions/{name}/dead-letters/{letter}").status_code in (200, 204)
    assert scrape(srv).get("impuls_async_dead_letters", function=name) is None


def test_a_deleted_function_s_series_go(srv: Server) -> None:
    name = deploy(srv, MAYBE_FAIL, prefix="met")
    invoke_ok(srv, name)
    assert scrape(srv).value("impuls_invocations_total", function=name, outcome="success") == 1
    assert srv.request("DELETE", f"/api/v1/functions/{name}").status_code == 200
    poll(lambda: scrape(srv), lambda s: name not in s.text, timeout=10, what="the series dropped")


def test_builds_by_result(srv: Server) -> None:
    before = scrape(srv)
    deploy(srv, MAYBE_FAIL + f"# {unique()}\n", prefix="met")  # new code: built once
    deploy(srv, MAYBE_FAIL + "# the same code again: its package is reused, no build\n", prefix="met")
    deploy(srv, MAYBE_FAIL + "# the same code again: its package is reused, no build\n", prefix="met")
    bad = srv.create(name=unique("met"), runtime="python3.11", handler="handler.handler",
                     code_zip=make_zip({"handler.py": MAYBE_FAIL,
                                        "requirements.txt": "this is not ( a requirement\n"}))
    assert bad.status_code == 400, bad.text  # pip install failed
    after = scrape(srv)
    assert after.value("impuls_builds_total", result="success") - before.value(
        "impuls_builds_total", result="success") == 2
    assert after.value("impuls_builds_total", result="failure") - before.value(
        "impuls_builds_total", result="failure") == 1


# --- HTTP requests --------------------------------------------------------------------------


def test_http_requests_by_route_template_and_status(srv: Server) -> None:
    missing = unique("nope")
    name = deploy(srv, MAYBE_FAIL, prefix="met")
    before = scrape(srv)
    assert srv.request("GET", f"/api/v1/functions/{missing}").status_code == 404
    assert srv.request("GET", f"/api/v1/functions/{name}").status_code == 200
    assert srv.request("GET", "/health").status_code == 200
    assert srv.request("GET", f"/no/such/{missing}").status_code == 404
    assert srv.invoke(name, {}).status_code == 200
    assert srv.invoke(missing, {}).status_code == 404
    assert srv.request("GET", f"/fn/{missing}/").status_code == 404
    lam = httpx.post(f"{srv.url}/2015-03-31/functions/{missing}/invocations", content=b"{}")
    assert lam.status_code in (401, 403), lam.text
    after = scrape(srv)

    def delta(route: str, status: str) -> float:
        return (after.value("impuls_http_requests_total", route=route, status=status)
                - before.value("impuls_http_requests_total", route=route, status=status))

    assert delta("/api/v1/functions/{name}", "404") == 1
    assert delta("/api/v1/functions/{name}", "200") == 1
    assert delta("/health", "200") >= 1
    assert delta("other", "404") == 1
    assert delta("/api/v1/functions/{name}/invoke", "200") == 1
    assert delta("/api/v1/functions/{name}/invoke", "404") == 1
    assert delta("url", "404") == 1
    assert delta("lambda:Invoke", str(lam.status_code)) == 1
    assert delta("/metrics", "200") >= 1  # the scrape before
    routes = after.labels("impuls_http_requests_total", "route")
    assert not any(missing in r or name in r for r in routes), routes  # never a raw path


# --- who may read /metrics --------------------------------------------------------------------


def _key(server: Server, scope: str, functions: str = "*") -> str:
    r = server.request("POST", "/api/v1/keys", json={"name": unique("k"), "scope": scope,
                                                     "functions": functions})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_metrics_need_a_read_key_over_every_function(make_server: Callable[..., Server]) -> None:
    server = make_server()
    anonymous = httpx.get(f"{server.url}/metrics")
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.json()["error"] is True
    unknown = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer not-a-key"})
    assert unknown.status_code == 401
    limited = httpx.get(f"{server.url}/metrics",
                        headers={"Authorization": f"Bearer {_key(server, 'read', 'team-*')}"})
    assert limited.status_code == 403, limited.text
    reader = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {_key(server, 'read')}"})
    got = scrape(server, reader)
    assert got.value("impuls_server_info", sandbox=sandbox_of(server)) == 1
    # counted too, with their statuses
    assert got.value("impuls_http_requests_total", route="/metrics", status="401") == 2
    assert got.value("impuls_http_requests_total", route="/metrics", status="403") == 1


def test_metrics_public(make_server: Callable[..., Server]) -> None:
    server = make_server(args=["--metrics-public"])
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200, r.text
    assert "impuls_invocations_in_flight 0.0" in r.text
    assert httpx.get(f"{server.url}/api/v1/functions").status_code == 401  # the API is not


def test_metrics_public_from_the_environment(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_METRICS_PUBLIC": "1"})
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_servers_do_not_share_counts(make_server: Callable[..., Server]) -> None:
    one, two = make_server(), make_server()
    name = unique("met")
    for server in (one, two):
        server.deploy(name=name, runtime="python3.11", handler="handler.handler", code=MAYBE_FAIL)
    invoke_ok(one, name)
    invoke_ok(one, name)
    invoke_ok(two, name)
    assert scrape(one).value("impuls_invocations_total", function=name, outcome="success") == 2
    assert scrape(two).value("impuls_invocations_total", function=name, outcome="success") == 1


# --- JSON logs --------------------------------------------------------------------------------


def test_json_logs(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_ADMIN_KEY": ""}, args=["--log-format", "json"])
    admin_key = (server.data_dir / "admin-key").read_text().strip()
    assert httpx.get(f"{server.url}/api/v1/functions").status_code == 401
    server.stop()
    text = server.log()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, text
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    for doc in docs:
        assert {"time", "level", "logger", "message"} <= doc.keys(), doc
        assert doc["time"].endswith("Z") and "T" in doc["time"], doc
    listening = [d for d in docs if d["message"].startswith("Impuls listening on")]
    assert listening and listening[0]["level"] == "INFO" and listening[0]["logger"] == "impuls", docs
    assert any("admin API key was written to" in d["message"] and d["level"] == "WARNING" for d in docs)
    assert admin_key not in text


def test_text_logs_stay_the_default(make_server: Callable[..., Server]) -> None:
    server = make_server()
    server.stop()
    line = next(x for x in server.log().splitlines() if "Impuls listening on" in x)
    assert " INFO impuls: Impuls listening on" in line
    assert not line.startswith("{")
    assert server.admin_key not in server.log()


def test_a_bad_log_format_is_refused(make_server: Callable[..., Server]) -> None:
    with pytest.raises(RuntimeError, match="log format must be text or json"):
        make_server(env={"IMPULS_LOG_FORMAT": "xml"})


def test_json_formatter_carries_the_exception() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        record = logging.LogRecord("impuls.api", logging.ERROR, __file__, 1, "failed: %s", ("x",),
                                   sys.exc_info())
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "ERROR" and doc["logger"] == "impuls.api" and doc["message"] == "failed: x"
    assert "ValueError: bad thing" in doc["exception"] and "Traceback" in doc["exception"]
    plain = json.loads(JsonFormatter().format(logging.LogRecord("impuls", logging.INFO, __file__, 1,
                                                                "line\nbreak", None, None)))
    assert plain["message"] == "line\nbreak" and "exception" not in plain
    assert time.time() - 60 < _epoch(plain["time"]) <= time.time() + 1


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
