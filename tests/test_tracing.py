"""OpenTelemetry traces through a real server exporting to an OTLP/HTTP receiver this test runs.

The receiver accepts ``POST /v1/traces`` on 127.0.0.1 and decodes each body with
``opentelemetry-proto``'s ``ExportTraceServiceRequest``; the tests look at the span tree
(parents, children, attributes) and at the trace the function itself saw.
"""

from __future__ import annotations

import gzip
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from impuls import tracing
from impuls.config import Settings
from tests.helpers import Server
from tests.lambda_fixtures import make_credentials, signed_request
from tests.url_fixtures import deploy_with_url

PY_TRACE = """
import os, time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {"trace": os.environ.get("_X_AMZN_TRACE_ID"), "request_id": context.aws_request_id}
"""
NODE_TRACE = """
exports.handler = async (event, context) => ({
  trace: process.env._X_AMZN_TRACE_ID, request_id: context.awsRequestId,
});
"""
URL_TRACE = """
import json, os
def handler(event, context):
    return {"statusCode": 200, "body": json.dumps({"trace": os.environ.get("_X_AMZN_TRACE_ID")})}
"""
XRAY = re.compile(r"^Root=1-([0-9a-f]{8})-([0-9a-f]{24});Parent=([0-9a-f]{16});Sampled=([01])$")


# --- the OTLP/HTTP receiver --------------------------------------------------------------------


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]
    start_ns: int
    end_ns: int


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class Collector:
    """Collects the spans posted to it; ``posts`` counts the requests."""

    spans: list[Span] = field(default_factory=list)
    posts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    found.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                      s.kind, _attributes(s.attributes), s.status.code, resource,
                                      s.start_time_unix_nano, s.end_time_unix_nano))
        with self.lock:
            self.posts += 1
            self.spans.extend(found)

    def wait(self, match: Callable[[Span], bool], count: int = 1, timeout: float = 15) -> list[Span]:
        """The spans ``match`` accepts, once there are ``count`` of them (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for s in self.spans if match(s)]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"{len(found)} of {count} spans arrived: {found}"
                return found
            time.sleep(0.02)

    def children(self, parent: Span, count: int, timeout: float = 15) -> dict[str, Span]:
        spans = self.wait(lambda s: s.parent_id == parent.span_id, count, timeout)
        return {s.name: s for s in spans}


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    """An OTLP/HTTP receiver on a free 127.0.0.1 port: (its spans, its endpoint)."""
    spans = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            spans.receive(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield spans, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, str]) -> Iterator[Server]:
    """A server exporting its spans to the collector, every 50 ms."""
    srv = Server(tmp_path_factory.mktemp("traced") / "data",
                 env={"IMPULS_OTLP_ENDPOINT": collector[1], "OTEL_BSP_SCHEDULE_DELAY": "50"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def spans(collector: tuple[Collector, str]) -> Collector:
    return collector[0]


def new_parent() -> tuple[str, str, str]:
    """A caller's (trace id, span id, traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def xray_parts(header: str) -> tuple[str, str, str]:
    """(trace id as 32 hex, parent span id, sampled) of an X-Ray trace header."""
    m = XRAY.match(header)
    assert m, header
    return m[1] + m[2], m[3], m[4]


def invoke(server: Server, name: str, event: Any = None, headers: dict[str, str] | None = None,
           **params: Any) -> httpx.Response:
    return server.client.post(f"/api/v1/functions/{name}/invoke", content=json.dumps(event or {}),
                              params=params, headers={"Content-Type": "application/json", **(headers or {})})


def invocation_span(spans: Collector, request_id: str) -> Span:
    return spans.wait(lambda s: s.name.startswith("invoke ")
                      and s.attributes.get("faas.invocation_id") == request_id)[0]


# --- tracing on --------------------------------------------------------------------------------


def test_native_invoke_continues_the_callers_trace(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
    sandbox = traced.client.get("/health").json()["sandbox"]
    for cold in (True, False):
        trace_id, caller, traceparent = new_parent()
        r = invoke(traced, name, headers={"traceparent": traceparent, "tracestate": "vendor=x"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["cold_start"] is cold
        span = invocation_span(spans, doc["request_id"])
        assert (span.name, span.trace_id, span.parent_id) == (f"invoke {name}", trace_id, caller)
        assert span.kind == 2  # SERVER
        assert span.attributes == {
            "faas.name": name, "faas.invocation_id": doc["request_id"], "faas.version": "$LATEST",
            "faas.coldstart": cold, "impuls.outcome": "success", "impuls.sandbox": sandbox}
        assert span.status != 2
        children = spans.children(span, 2 if cold else 1)
        assert set(children) == ({"instance start", "runtime call"} if cold else {"runtime call"})
        call = children["runtime call"]
        assert call.trace_id == trace_id and call.attributes["impuls.instance_id"]
        assert span.start_ns <= call.start_ns <= call.end_ns <= span.end_ns
        if cold:
            start = children["instance start"]
            assert start.attributes["impuls.instance_id"] == call.attributes["impuls.instance_id"]
            assert start.attributes["impuls.sandbox"] == sandbox
            assert start.end_ns <= call.start_ns
        # the function saw the same trace, its parent the runtime call
        assert xray_parts(doc["body"]["trace"]) == (trace_id, call.span_id, "1")
        assert doc["body"]["trace"] == tracing.traceparent_to_xray(f"00-{trace_id}-{call.span_id}-01")
        assert span.resource["service.name"] == "impuls"
        assert span.resource["impuls.sandbox"] == sandbox and span.resource["impuls.node"]


def test_a_call_without_traceparent_starts_a_trace(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
    doc = invoke(traced, name, headers={"traceparent": "00-not-a-valid-header-01"}).json()
    span = invocation_span(spans, doc["request_id"])
    assert span.parent_id == ""
    call = spans.children(span, 2)["runtime call"]
    assert xray_parts(doc["body"]["trace"]) == (span.trace_id, call.span_id, "1")


def test_an_unsampled_caller_is_not_recorded_but_still_continued(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
    trace_id, caller, _ = new_parent()
    doc = invoke(traced, name, headers={"traceparent": f"00-{trace_id}-{caller}-00"}).json()
    root, parent, sampled = xray_parts(doc["body"]["trace"])
    assert (root, sampled) == (trace_id, "0") and parent != caller
    time.sleep(0.3)
    assert not [s for s in spans.spans if s.trace_id == trace_id]


def test_queue_wait_and_errors(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE,
                         max_concurrency=1)["name"]
    assert invoke(traced, name).status_code == 200  # warm: the next two find the instance
    replies: list[httpx.Response] = []

    def call(event: dict[str, Any]) -> None:
        replies.append(invoke(traced, name, event))

    first = threading.Thread(target=call, args=({"sleep": 0.5},))
    first.start()
    time.sleep(0.15)
    call({"fail": True})  # waits for the instance the first call holds, then fails
    first.join()
    failed = next(r.json() for r in replies if r.json().get("error_type"))
    span = invocation_span(spans, failed["request_id"])
    assert span.attributes["impuls.outcome"] == "error"
    assert span.attributes["error.type"] == "ValueError" and span.status == 2
    children = spans.children(span, 2)
    wait = children["queue wait"]
    assert set(children) == {"queue wait", "runtime call"}
    assert wait.end_ns - wait.start_ns > 0.1e9 and wait.attributes["impuls.pool.busy"] == 1
    assert wait.end_ns <= children["runtime call"].start_ns


def test_a_refused_call_is_a_failed_span(traced: Server, spans: Collector) -> None:
    trace_id, caller, traceparent = new_parent()
    r = invoke(traced, "no-such-function", headers={"traceparent": traceparent})
    assert r.status_code == 404
    span = spans.wait(lambda s: s.trace_id == trace_id)[0]
    assert (span.name, span.parent_id, span.status) == ("invoke no-such-function", caller, 2)
    assert span.attributes["error.type"] == "FunctionNotFound"
    assert span.attributes["impuls.outcome"] == "refused"


def test_node_function_sees_the_trace(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="nodejs20", handler="index.handler", code=NODE_TRACE)["name"]
    trace_id, caller, traceparent = new_parent()
    doc = invoke(traced, name, headers={"traceparent": traceparent}).json()
    span = invocation_span(spans, doc["request_id"])
    assert (span.trace_id, span.parent_id) == (trace_id, caller)
    call = spans.children(span, 2)["runtime call"]
    assert xray_parts(doc["body"]["trace"]) == (trace_id, call.span_id, "1")


def test_lambda_api_invoke_continues_the_trace(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
    creds = make_credentials(traced, "invoke")
    path = f"/2015-03-31/functions/{name}/invocations"
    trace_id, caller, traceparent = new_parent()
    r = signed_request(traced.url, creds, "POST", path, b"{}", headers={"traceparent": traceparent})
    assert r.status_code == 200, r.text
    span = invocation_span(spans, r.json()["request_id"])
    assert (span.trace_id, span.parent_id) == (trace_id, caller)
    # an X-Ray caller (X-Amzn-Trace-Id) is continued too
    xray_trace, xray_parent, _ = new_parent()
    header = f"Root=1-{xray_trace[:8]}-{xray_trace[8:]};Parent={xray_parent};Sampled=1"
    r = signed_request(traced.url, creds, "POST", path, b"{}", headers={"X-Amzn-Trace-Id": header})
    span = invocation_span(spans, r.json()["request_id"])
    assert (span.trace_id, span.parent_id) == (xray_trace, xray_parent)
    assert xray_parts(r.json()["trace"])[0] == xray_trace


def test_function_url_continues_the_trace(traced: Server, spans: Collector) -> None:
    name = deploy_with_url(traced, URL_TRACE)
    trace_id, caller, traceparent = new_parent()
    r = httpx.get(f"{traced.url}/fn/{name}/", headers={"traceparent": traceparent}, timeout=60)
    assert r.status_code == 200, r.text
    span = spans.wait(lambda s: s.trace_id == trace_id and s.name == f"invoke {name}")[0]
    assert span.parent_id == caller
    call = spans.children(span, 2)["runtime call"]
    assert xray_parts(r.json()["trace"]) == (trace_id, call.span_id, "1")


def test_an_asynchronous_event_is_delivered_in_the_callers_trace(traced: Server, spans: Collector) -> None:
    name = traced.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
    trace_id, caller, traceparent = new_parent()
    r = invoke(traced, name, headers={"traceparent": traceparent}, **{"async": "true"})
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]
    accept = spans.wait(lambda s: s.name == f"accept {name}")[0]
    assert (accept.trace_id, accept.parent_id, accept.kind) == (trace_id, caller, 4)  # PRODUCER
    assert accept.attributes["faas.invocation_id"] == request_id
    deliver = spans.wait(lambda s: s.name == f"deliver {name}")[0]
    assert (deliver.trace_id, deliver.parent_id, deliver.kind) == (trace_id, accept.span_id, 5)  # CONSUMER
    assert deliver.attributes["impuls.outcome"] == "success"
    assert deliver.attributes["impuls.event.attempt"] == 1
    assert deliver.attributes["impuls.event.source"] == "api"
    span = invocation_span(spans, request_id)
    assert (span.trace_id, span.parent_id) == (trace_id, deliver.span_id)
    call = spans.children(span, 2)["runtime call"]
    event = traced.client.get(f"/api/v1/functions/{name}/invocations/{request_id}").json()
    assert xray_parts(event["result"]["trace"]) == (trace_id, call.span_id, "1")


def test_sigterm_flushes_the_last_spans(tmp_path: Path, collector: tuple[Collector, str]) -> None:
    """With the default 5 s schedule, only the server's shutdown can have sent these spans."""
    spans, endpoint = collector
    srv = Server(tmp_path / "data", env={"IMPULS_OTLP_ENDPOINT": endpoint + "/v1/traces",
                                         "OTEL_BSP_SCHEDULE_DELAY": "60000"}).start()
    try:
        name = srv.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
        request_id = invoke(srv, name).json()["request_id"]
        time.sleep(0.3)
        assert not [s for s in spans.spans if s.attributes.get("faas.invocation_id") == request_id]
    finally:
        srv.stop()
    span = spans.wait(lambda s: s.attributes.get("faas.invocation_id") == request_id, timeout=0.1)[0]
    assert set(spans.children(span, 2, timeout=0.1)) == {"instance start", "runtime call"}


# --- tracing off -----------------------------------------------------------------------------


def test_off_the_function_sees_the_trace_id_of_its_request(tmp_path: Path,
                                                          collector: tuple[Collector, str]) -> None:
    spans, _ = collector
    before = spans.posts
    srv = Server(tmp_path / "data").start()
    try:
        name = srv.deploy(runtime="python3.11", handler="handler.handler", code=PY_TRACE)["name"]
        _, _, traceparent = new_parent()
        doc = invoke(srv, name, headers={"traceparent": traceparent}).json()
    finally:
        srv.stop()
    m = re.fullmatch(r"Root=1-[0-9a-f]{8}-([0-9a-f]{24});Sampled=0", doc["body"]["trace"])
    assert m and m[1] == doc["request_id"].replace("-", "")[-24:], doc["body"]
    assert spans.posts == before


def test_off_there_is_no_tracer_and_no_exporter_thread(tmp_path: Path) -> None:
    import asyncio

    from impuls.platform import Platform

    settings = Settings(data_dir=tmp_path / "data", sandbox="process", auth=False)
    assert tracing.start(settings, "node", "process") is None

    async def run() -> list[str]:
        platform = Platform(settings)
        await platform.start()
        try:
            assert platform.tracer is None and platform.invoker.tracer is None
            assert platform.events.tracer is None
            return [t.name for t in threading.enumerate()]
        finally:
            await platform.stop()
            platform.close()

    threads = asyncio.run(run())
    assert not [t for t in threads if t.startswith("OtelBatch")], threads


def test_on_the_exporter_thread_runs_until_shutdown(collector: tuple[Collector, str]) -> None:
    spans, endpoint = collector
    tracer = tracing.start(Settings(otlp_endpoint=endpoint), "unit-node", "process")
    assert tracer is not None and tracer.endpoint == endpoint + "/v1/traces"
    assert [t for t in threading.enumerate() if t.name.startswith("OtelBatch")]
    trace = tracer.invocation("unit", str(uuid.uuid4()), None, None)
    trace.finish({"impuls.outcome": "success"})
    tracer.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("OtelBatch") and t.is_alive()]
    span = spans.wait(lambda s: s.name == "invoke unit", timeout=1)[0]
    assert span.resource["impuls.node"] == "unit-node"


# --- the two forms of a trace context ----------------------------------------------------------


def test_xray_and_w3c_forms_convert_both_ways() -> None:
    trace_id, span_id = 0x5759E988BD862E3FE1BE46A994272793, 0x53995C3F42CD8AD8
    header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    traceparent = "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
    assert tracing.xray_header(trace_id, span_id, True) == header
    assert tracing.xray_header(trace_id, span_id, False) == header[:-1] + "0"
    assert tracing.xray_header(1, 2, True) == (
        "Root=1-00000000-000000000000000000000001;Parent=0000000000000002;Sampled=1")
    assert tracing.xray_to_traceparent(header) == traceparent
    assert tracing.traceparent_to_xray(traceparent) == header
    assert tracing.traceparent_to_xray(traceparent[:-2] + "00") == header[:-1] + "0"
    assert tracing.traceparent_to_xray(traceparent[:-2] + "03") == header  # W3C level 2 flags
    # order, spaces, case and extra fields of an X-Ray header do not matter; Sampled=0 is kept
    assert tracing.xray_to_traceparent(
        "Self=1-abc; Sampled=0 ;Parent=53995C3F42CD8AD8;Root=1-5759E988-BD862E3FE1BE46A994272793;Lineage=a:1"
    ) == traceparent[:-2] + "00"
    # no Sampled, or Sampled=? (the receiver decides): continued as sampled
    assert tracing.xray_to_traceparent(header.rsplit(";", 1)[0]) == traceparent
    assert tracing.xray_to_traceparent(header[:-1] + "?") == traceparent
    for bad in ("", "Root=1-5759e988-bd862e3fe1be46a994272793", "Parent=53995c3f42cd8ad8",
                "Root=2-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8",
                "Root=1-5759e988-bd862e3fe1be46a99427279;Parent=53995c3f42cd8ad8",
                "Root=1-00000000-000000000000000000000000;Parent=53995c3f42cd8ad8",
                "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=0000000000000000",
                "Root=1-5759e988-bd862e3fe1be46a99427279x;Parent=53995c3f42cd8ad8"):
        assert tracing.xray_to_traceparent(bad) is None, bad
    for bad in ("", "01-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01",
                "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8",
                "00-00000000000000000000000000000000-53995c3f42cd8ad8-01",
                "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-zz"):
        assert tracing.traceparent_to_xray(bad) is None, bad


def test_the_callers_trace_from_headers() -> None:
    traceparent = "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
    xray = "Root=1-0123abcd-0123456789abcdef01234567;Parent=1111111111111111;Sampled=1"
    assert tracing.parent_headers({}) == (None, None)
    assert tracing.parent_headers({"traceparent": traceparent, "tracestate": "a=1",
                                   "x-amzn-trace-id": xray}) == (traceparent, "a=1")
    assert tracing.parent_headers({"x-amzn-trace-id": xray}) == (
        "00-0123abcd0123456789abcdef01234567-1111111111111111-01", None)
    assert tracing.parent_headers({"x-amzn-trace-id": "Root=nonsense"}) == (None, None)
    assert tracing.parent_of_asgi([(b"host", b"x"), (b"traceparent", traceparent.encode())]) == (
        traceparent, None)
    assert tracing.endpoint_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert tracing.endpoint_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing.endpoint_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
