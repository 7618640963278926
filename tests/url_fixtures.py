"""Helpers shared by the function URL acceptance tests (``test_function_urls.py``,
``test_url_frameworks.py``).

Function URLs are tested as a black box, from the outside: configurations through
``/api/v1/functions/{name}/url`` (or the Lambda API, or the CLI), requests to
``/fn/<name>[:<qualifier>]/...`` (or to ``<name>.<IMPULS_URL_DOMAIN>`` by the Host header), and
what the function saw (payload format 2.0) read back from its answer.  Nothing here knows how
the URLs are implemented.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx

from tests.helpers import Server, unique
from tests.lambda_fixtures import poll

#: generous: a cold start in a microVM, a build, a slow CI machine; never a speed assertion
TIMEOUT = 120.0
#: payload format 2.0's requestContext.time, e.g. "12/Mar/2020:19:03:58 +0000"
EXAMPLE_TIME = "12/Mar/2020:19:03:58 +0000"
EVENT_TIME = re.compile(r"^\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000$")
#: how long the streaming handlers wait between their first and their second event (ms)
STREAM_GAP_MS = 3000

# --- functions -----------------------------------------------------------------------------


def echo_source(tag: str = "v1") -> str:
    """Python (``handler.handler``): answers the event it got as its JSON body.  ``x-code``
    names the code that ran (versions differ by ``tag``), ``x-request-id`` the invocation."""
    return (
        "import json\n"
        f"TAG = {tag!r}\n"
        "def handler(event, context):\n"
        "    return {'statusCode': 200,\n"
        "            'headers': {'content-type': 'application/json', 'x-code': TAG,\n"
        "                        'x-request-id': context.aws_request_id},\n"
        "            'body': json.dumps(event)}\n"
    )


#: Python (``handler.handler``): what it answers is chosen by the request's path.
APP = """
import base64, json, time

def text_body(event):
    body = event.get("body") or ""
    return base64.b64decode(body).decode() if event.get("isBase64Encoded") else body

def handler(event, context):
    path = event.get("rawPath", "")
    if path == "/respond":                  # the request's JSON {"result": X}: the handler returns X
        return json.loads(text_body(event))["result"]
    if path == "/mirror":                   # the request's body and content type, sent back as they came
        headers = event.get("headers") or {}
        return {"statusCode": 200,
                "headers": {"content-type": headers.get("content-type", "application/octet-stream")},
                "body": event.get("body") or "", "isBase64Encoded": bool(event.get("isBase64Encoded"))}
    if path == "/fail":
        raise ValueError("failed on purpose")
    if path == "/print":
        marker = (event.get("queryStringParameters") or {}).get("marker", "")
        print("url-log-line", marker, flush=True)
        return {"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": "printed " + marker}
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
"""

#: Python (``handler.handler``): runs far past its ``timeout_sec``.
SLEEPER = "import time\ndef handler(event, context):\n    time.sleep(120)\n    return 'never'\n"

#: Python (``handler.handler``): its module fails to load.
BROKEN_AT_IMPORT = "raise RuntimeError('broken at import')\ndef handler(event, context):\n    return 1\n"

#: Node.js (``index.handler``), buffered: the Lambda response object of payload format 2.0.
NODE_BUFFERED = """
exports.handler = async (event, context) => ({
  statusCode: 202,
  headers: { "content-type": "application/json", "x-node": "yes" },
  cookies: ["n1=one; Path=/", "n2=two; Secure"],
  body: JSON.stringify({ rawPath: event.rawPath, query: event.queryStringParameters || null,
                         method: event.requestContext.http.method, name: context.functionName }),
});
"""

#: Node.js (``index.handler``), response streaming as on Lambda: ``awslambda.streamifyResponse``
#: and ``awslambda.HttpResponseStream.from`` (the status and headers, then the body's chunks).
NODE_STREAM = """
const { pipeline } = require("node:stream/promises");
const { Readable } = require("node:stream");

const GAP_MS = __GAP_MS__;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const event_ = (n) => `id: ${n}\\ndata: ${JSON.stringify({ n, at: Date.now() })}\\n\\n`;

exports.handler = awslambda.streamifyResponse(async (event, responseStream, context) => {
  const path = event.rawPath || "/";
  if (path === "/sse") {
    // server-sent events: the first is written, then nothing for GAP_MS, then the second
    const stream = awslambda.HttpResponseStream.from(responseStream, {
      statusCode: 200,
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
    });
    stream.write(event_(1));
    await sleep(GAP_MS);
    stream.write(event_(2));
    stream.end();
    return;
  }
  if (path === "/chunks") {
    // a status and headers of its own, text and binary chunks through stream.pipeline
    const stream = awslambda.HttpResponseStream.from(responseStream, {
      statusCode: 201,
      headers: { "content-type": "application/octet-stream", "x-streamed": "yes" },
    });
    const binary = Buffer.from([0, 1, 2, 127, 128, 253, 254, 255]);
    const chunks = [Buffer.from("alpha,"), Buffer.from("beta,"), binary];
    await pipeline(Readable.from(chunks), stream);
    return;
  }
  // anything else: the event it got, as JSON, in two writes
  const stream = awslambda.HttpResponseStream.from(responseStream, {
    statusCode: 200, headers: { "content-type": "application/json" },
  });
  const body = JSON.stringify(event);
  stream.write(body.slice(0, 7));
  stream.write(body.slice(7));
  stream.end();
});
""".replace("__GAP_MS__", str(STREAM_GAP_MS))

#: Python (``handler.handler``), response streaming: a generator handler, each ``yield`` a chunk
#: of the body.  THE PYTHON STREAMING CONTRACT IS BEING DESIGNED: adjust this source (and only
#: it, if possible) to what docs/adding-runtimes.md says once it lands.
PY_STREAM = f"""
import json, time

def event(n):
    return "id: %d\\ndata: %s\\n\\n" % (n, json.dumps({{"n": n, "at": time.time() * 1000}}))

def handler(event_, context):
    yield event(1)
    time.sleep({STREAM_GAP_MS / 1000})
    yield event(2)
"""

# --- bodies ----------------------------------------------------------------------------------


def png_bytes(width: int = 3, height: int = 2) -> bytes:
    """A real, valid PNG image (RGBA), built here: binary bytes that are not UTF-8."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"".join(bytes((x * 80 % 256, y * 120 % 256, 200, 255)) for x in range(width))
                    for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    return png + chunk(b"IEND", b"")


#: every byte value, several times over
ALL_BYTES = bytes(range(256)) * 16

# --- servers, keys and URL configurations ---------------------------------------------------


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Keep no cookie a response sets: every request sends exactly the headers a test gives."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def public_client(server: Server) -> httpx.Client:
    """A client of ``server`` (on 127.0.0.1) that sends no credentials at all, as curl would,
    and keeps no cookies."""
    return httpx.Client(base_url=server.url, timeout=TIMEOUT,
                        cookies=http.cookiejar.CookieJar(policy=_NoCookies()))


def url_config_path(name: str) -> str:
    return f"/api/v1/functions/{name}/url"


def configure_url(server: Server, name: str, **body: Any) -> dict[str, Any]:
    """``POST /api/v1/functions/{name}/url`` with ``body``; fail the test unless it is 201 with
    the URL of ``/fn/<name>[:<qualifier>]/`` on this server."""
    r = server.request("POST", url_config_path(name), json=body)
    assert r.status_code == 201, r.text
    doc = dict(r.json())
    qualifier = body.get("qualifier", "$LATEST")
    suffix = "" if qualifier == "$LATEST" else f":{qualifier}"
    assert doc["url"] == f"{server.url}/fn/{name}{suffix}/", doc
    return doc


def deploy_with_url(server: Server, code: str, runtime: str = "python3.11", handler: str = "handler.handler",
                    url: dict[str, Any] | None = None, **fields: Any) -> str:
    """A new function (single-file ``code``) with a URL configuration (``auth_type`` NONE unless
    ``url`` says otherwise); returns its name."""
    fn = server.deploy(name=unique("url"), runtime=runtime, handler=handler, code=code, **fields)
    name = str(fn["name"])
    configure_url(server, name, **{"auth_type": "NONE", **(url or {})})
    return name


def make_key(server: Server, scope: str, functions: str = "*") -> dict[str, Any]:
    """A new key of ``scope`` (made with the admin key): ``key`` (Bearer), ``access_key_id``,
    ``secret_access_key`` (SigV4)."""
    r = server.request("POST", "/api/v1/keys", json={"name": unique(f"url-{scope}"), "scope": scope,
                                                      "functions": functions})
    assert r.status_code == 201, r.text
    return dict(r.json())


# --- what the function saw -------------------------------------------------------------------


def event_of(r: httpx.Response) -> dict[str, Any]:
    """The payload format 2.0 event an echoing function answered with."""
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    return dict(r.json())


def check_event_shape(event: dict[str, Any]) -> None:
    """Field names and JSON types of payload format 2.0, as in the AWS documentation's examples
    (API Gateway HTTP API "Payload format version 2.0", Lambda "Invoking function URLs")."""
    expected_top = {"version": str, "routeKey": str, "rawPath": str, "rawQueryString": str,
                    "headers": dict, "requestContext": dict, "isBase64Encoded": bool}
    for key, kind in expected_top.items():
        assert isinstance(event.get(key), kind), f"{key}: {event.get(key)!r} is not a {kind.__name__}"
    optional = {"cookies": list, "queryStringParameters": dict, "body": str}
    for key, kind in optional.items():
        if event.get(key) is not None:
            assert isinstance(event[key], kind), f"{key}: {event[key]!r} is not a {kind.__name__}"
    assert all(isinstance(c, str) for c in event.get("cookies") or []), event.get("cookies")
    for mapping in ("headers", "queryStringParameters"):
        for k, v in (event.get(mapping) or {}).items():
            assert isinstance(k, str) and isinstance(v, str), (mapping, k, v)
    for k in event["headers"]:
        assert k == k.lower(), f"header name {k!r} is not lower-case"
    ctx = event["requestContext"]
    for key in ("accountId", "apiId", "domainName", "domainPrefix", "requestId", "routeKey", "stage", "time"):
        assert isinstance(ctx.get(key), str), f"requestContext.{key}: {ctx.get(key)!r} is not a string"
    assert ctx["apiId"] and ctx["requestId"] and ctx["domainName"], ctx
    assert isinstance(ctx.get("timeEpoch"), int) and not isinstance(ctx["timeEpoch"], bool), ctx
    assert EVENT_TIME.match(ctx["time"]), f"requestContext.time {ctx['time']!r}: not like {EXAMPLE_TIME}"
    stamp = datetime.strptime(ctx["time"], "%d/%b/%Y:%H:%M:%S %z").timestamp()
    assert abs(stamp - ctx["timeEpoch"] / 1000) <= 1.0, (ctx["time"], ctx["timeEpoch"])
    http = ctx.get("http")
    assert isinstance(http, dict), ctx
    for key in ("method", "path", "protocol", "sourceIp", "userAgent"):
        assert isinstance(http.get(key), str), f"requestContext.http.{key}: {http.get(key)!r}"
    assert (event["version"], event["routeKey"], ctx["routeKey"], ctx["stage"]) == (
        "2.0", "$default", "$default", "$default"), event
    assert http["path"] == event["rawPath"] and event["rawPath"].startswith("/"), event


# --- invocation records ----------------------------------------------------------------------


def records(server: Server, name: str) -> list[dict[str, Any]]:
    r = server.request("GET", f"/api/v1/functions/{name}/invocations", params={"limit": 200})
    assert r.status_code == 200, r.text
    return list(r.json()["invocations"])


def wait_record(server: Server, name: str, request_id: str) -> dict[str, Any]:
    """The invocation record of ``request_id``, once it is there (a generous deadline)."""
    found = poll(lambda: [x for x in records(server, name) if x["request_id"] == request_id], bool,
                 timeout=TIMEOUT, what=f"the invocation record of {request_id}")
    return found[0]


@contextlib.contextmanager
def never_runs(server: Server, name: str) -> Iterator[None]:
    """The requests made inside do not run ``name``: afterwards a control call through the
    native invoke API is recorded, and it is the only new record."""
    before = {x["request_id"] for x in records(server, name)}
    yield
    r = server.invoke(name, {"control": True})
    assert r.status_code == 200, r.text
    control = r.json()["request_id"]
    wait_record(server, name, control)
    ran = {x["request_id"] for x in records(server, name)} - before - {control}
    assert not ran, f"{name} ran for a request that should never have reached it: {ran}"


# --- streaming -------------------------------------------------------------------------------


def read_sse(resp: httpx.Response) -> list[tuple[float, dict[str, Any]]]:
    """Server-sent events from a streamed response, as they arrive: (wall-clock time of arrival
    at this client, the event's JSON data)."""
    events: list[tuple[float, dict[str, Any]]] = []
    buf = b""
    for chunk in resp.iter_bytes():
        arrived = time.time()
        buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            data = [line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:")]
            if data:
                events.append((arrived, json.loads(b"\n".join(data))))
    return events


def assert_first_event_before_second_written(events: list[tuple[float, dict[str, Any]]]) -> None:
    """Event 1 reached this client before the handler wrote event 2 (``at``: the handler's
    wall clock when it wrote it, in ms): the response was streamed, not buffered."""
    assert [e["n"] for _, e in events] == [1, 2], events
    (arrived_1, _), (_, second) = events
    written_2 = second["at"] / 1000
    assert arrived_1 < written_2, (
        f"event 1 reached the client {arrived_1 - written_2:.3f}s after the handler wrote event 2: "
        "the response was buffered, not streamed")


# --- the CLI ---------------------------------------------------------------------------------


def impuls_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """``impuls --url <server> ARGS`` with the server's admin key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")}
    env["IMPULS_API_KEY"] = server.admin_key
    return subprocess.run([sys.executable, "-m", "impuls", "--url", server.url, *args],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env)
