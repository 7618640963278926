"""Function URLs, as on AWS Lambda: acceptance tests written from the specification, as a
black box, on SQLite and PostgreSQL.

A URL configuration (``/api/v1/functions/{name}/url``, the Lambda API's
CreateFunctionUrlConfig family, ``impuls url``) makes ``http://<server>/fn/<name>[:<alias>]/``
answer HTTP: each request becomes a payload format 2.0 event (the API Gateway HTTP API /
Lambda function URL format), the function's answer becomes the HTTP response. Around it:
authentication (NONE, KEY: a Bearer key of invoke scope or a SigV4 signature), CORS answered
by Impuls, qualifiers, routing by the Host header under ``IMPULS_URL_DOMAIN``, the HTTP errors
of failed, timed-out, throttled and oversized calls, and response streaming (Node.js
``awslambda.streamifyResponse``, a Python generator).

Streaming is tested by ordering, never by speed: the handler writes event 1, waits, writes
event 2, stamping each with its clock; event 1 must reach the client before event 2 was
written.  Every request goes to 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import Server, unique
from tests.lambda_fixtures import Credentials, lambda_client, poll, signed_request
from tests.url_fixtures import (
    ALL_BYTES,
    APP,
    BROKEN_AT_IMPORT,
    NODE_BUFFERED,
    NODE_STREAM,
    PY_STREAM,
    SLEEPER,
    TIMEOUT,
    assert_first_event_before_second_written,
    check_event_shape,
    configure_url,
    deploy_with_url,
    echo_source,
    event_of,
    impuls_cli,
    make_key,
    never_runs,
    png_bytes,
    public_client,
    read_sse,
    records,
    url_config_path,
    wait_record,
)

AGENT = "impuls-url-tests/1.0"


@pytest.fixture(scope="module")
def public(server: Server) -> Iterator[httpx.Client]:
    """A client of the server with no credentials and no cookie jar (as curl would be)."""
    with public_client(server) as client:
        yield client


@pytest.fixture(scope="module")
def echo(server: Server) -> str:
    """A Python function with a public URL that answers the event it got."""
    return deploy_with_url(server, echo_source())


@pytest.fixture(scope="module")
def app(server: Server) -> str:
    """A Python function with a public URL whose answer the request chooses (``APP``)."""
    return deploy_with_url(server, APP)


@pytest.fixture(scope="module")
def node_stream(server: Server) -> str:
    """A Node.js function streaming its response (``invoke_mode`` RESPONSE_STREAM)."""
    return deploy_with_url(server, NODE_STREAM, runtime="nodejs20", handler="index.handler",
                           url={"invoke_mode": "RESPONSE_STREAM"})


def respond(public: httpx.Client, app: str, result: Any) -> httpx.Response:
    """``app`` returns ``result`` as its handler's result."""
    return public.post(f"/fn/{app}/respond", json={"result": result})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sigv4(doc: dict[str, Any]) -> Credentials:
    return Credentials(doc["name"], doc["scope"], doc["access_key_id"], doc["secret_access_key"])


def header_list(value: str) -> list[str]:
    return [v.strip().lower() for v in value.split(",") if v.strip()]


# --- configuration ---------------------------------------------------------------------------


def test_configure_get_patch_delete(server: Server, public: httpx.Client) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source())["name"]
    path = url_config_path(name)
    assert server.request("GET", path).status_code == 404
    assert public.get(f"/fn/{name}/").status_code == 404

    cors = {"allow_origins": ["https://app.example.com"], "allow_methods": ["GET", "POST"],
            "allow_headers": ["x-custom"], "expose_headers": ["x-exposed"], "allow_credentials": True,
            "max_age": 300}
    created = configure_url(server, name, auth_type="NONE", qualifier="$LATEST", cors=cors,
                            invoke_mode="BUFFERED")
    assert (created["auth_type"], created["invoke_mode"]) == ("NONE", "BUFFERED"), created
    assert created["cors"] == cors, created
    assert event_of(public.get(f"/fn/{name}/")).get("rawPath") == "/"

    got = server.request("GET", path)
    assert got.status_code == 200, got.text
    assert (got.json()["url"], got.json()["auth_type"], got.json()["cors"]) == (created["url"], "NONE", cors)

    patched = server.request("PATCH", path, json={"auth_type": "KEY"})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["url"], patched.json()["auth_type"]) == (created["url"], "KEY")
    assert patched.json()["cors"] == cors and patched.json()["invoke_mode"] == "BUFFERED", patched.json()
    assert public.get(f"/fn/{name}/").status_code in (401, 403)
    assert server.request("GET", path).json()["auth_type"] == "KEY"

    deleted = server.request("DELETE", path)
    assert deleted.status_code in (200, 204), deleted.text
    assert server.request("GET", path).status_code == 404
    assert public.get(f"/fn/{name}/").status_code == 404
    again = configure_url(server, name, auth_type="NONE")
    assert again["invoke_mode"] == "BUFFERED" and again["url"] == created["url"], again
    assert public.get(f"/fn/{name}/").status_code == 200


def test_configuration_errors(server: Server) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source())["name"]
    path = url_config_path(name)
    for body in ({}, {"auth_type": "BASIC"}, {"auth_type": "NONE", "invoke_mode": "FAST"},
                 {"auth_type": "NONE", "colour": "red"},
                 {"auth_type": "NONE", "cors": {"allow_methods": ["FETCH"]}},
                 {"auth_type": "NONE", "cors": {"max_age": -1}},
                 {"auth_type": "NONE", "cors": {"allow_origins": "https://a.example.com"}},
                 {"auth_type": "NONE", "cors": {"allow_credentials": "yes"}}):
        r = server.request("POST", path, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"] is True and r.json()["message"], r.text
    assert server.request("GET", path).status_code == 404  # nothing was made

    assert server.request("POST", url_config_path("no-such-function"), json={"auth_type": "NONE"}
                          ).status_code == 404
    assert server.request("PATCH", path, json={"auth_type": "KEY"}).status_code == 404
    assert server.request("DELETE", path).status_code == 404

    # one URL per function and qualifier; a version is no qualifier for a URL (as on Lambda)
    configure_url(server, name, auth_type="NONE")
    r = server.request("POST", path, json={"auth_type": "KEY"})
    assert r.status_code == 409, r.text
    assert server.request("GET", path).json()["auth_type"] == "NONE"
    assert server.request("POST", f"/api/v1/functions/{name}/versions").status_code == 201
    r = server.request("POST", path, json={"auth_type": "NONE", "qualifier": "1"})
    assert r.status_code == 400, r.text
    r = server.request("POST", path, json={"auth_type": "NONE", "qualifier": "nosuchalias"})
    assert r.status_code == 404, r.text


def test_configuration_scopes_and_audit(server: Server) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source())["name"]
    path = url_config_path(name)
    read, invoke, deploy = (make_key(server, s)["key"] for s in ("read", "invoke", "deploy"))
    anonymous = httpx.post(server.url + path, json={"auth_type": "NONE"}, timeout=TIMEOUT)
    assert anonymous.status_code == 401
    for key in (read, invoke):
        r = httpx.post(server.url + path, json={"auth_type": "NONE"}, headers=bearer(key), timeout=TIMEOUT)
        assert r.status_code == 403, r.text
    r = httpx.post(server.url + path, json={"auth_type": "NONE"}, headers=bearer(deploy), timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    r = httpx.get(server.url + path, headers=bearer(read), timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["auth_type"] == "NONE", r.text
    r = httpx.delete(server.url + path, headers=bearer(invoke), timeout=TIMEOUT)
    assert r.status_code == 403, r.text
    assert server.request("DELETE", path).status_code in (200, 204)

    entries = server.request("GET", "/api/v1/audit", params={"limit": 200}).json()["entries"]
    mine = [(e["action"], e["target"]) for e in entries if name in (e["target"] or "")]
    assert ("url.put", f"{name}:$LATEST") in mine and ("url.delete", f"{name}:$LATEST") in mine, mine


def test_cli_url_create_get_rm(server: Server, public: httpx.Client) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source())["name"]
    assert server.request("POST", f"/api/v1/functions/{name}/versions").status_code == 201
    r = server.request("POST", f"/api/v1/functions/{name}/aliases",
                       json={"name": "live", "function_version": "1"})
    assert r.status_code == 201, r.text

    out = impuls_cli(server, "url", "create", name, "--auth-type", "NONE")
    assert out.returncode == 0, out.stderr
    assert f"{server.url}/fn/{name}/" in out.stdout, out.stdout
    assert event_of(public.get(f"/fn/{name}/cli"))["rawPath"] == "/cli"
    out = impuls_cli(server, "url", "get", name)
    assert out.returncode == 0 and f"{server.url}/fn/{name}/" in out.stdout, (out.stdout, out.stderr)

    out = impuls_cli(server, "url", "create", name, "--auth-type", "KEY", "--qualifier", "live")
    assert out.returncode == 0, out.stderr
    assert f"{server.url}/fn/{name}:live/" in out.stdout, out.stdout
    got = server.request("GET", url_config_path(name), params={"qualifier": "live"}).json()
    assert got["auth_type"] == "KEY" and got["url"] == f"{server.url}/fn/{name}:live/", got
    assert public.get(f"/fn/{name}:live/").status_code in (401, 403)
    out = impuls_cli(server, "url", "get", name, "--qualifier", "live")
    assert out.returncode == 0 and f"/fn/{name}:live/" in out.stdout, (out.stdout, out.stderr)

    out = impuls_cli(server, "url", "rm", name)
    assert out.returncode == 0, out.stderr
    assert public.get(f"/fn/{name}/").status_code == 404
    out = impuls_cli(server, "url", "get", name)
    assert out.returncode == 1 and "404" in out.stderr, (out.stdout, out.stderr)
    assert impuls_cli(server, "url", "rm", name, "--qualifier", "live").returncode == 0
    assert server.request("GET", url_config_path(name), params={"qualifier": "live"}).status_code == 404
    out = impuls_cli(server, "url", "create", name, "--auth-type", "SOMETIMES")
    assert out.returncode != 0


def test_url_created_with_boto3_is_served(server: Server, public: httpx.Client) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source())["name"]
    deployer, invoker = sigv4(make_key(server, "deploy")), sigv4(make_key(server, "invoke"))
    lam = lambda_client(server.url, deployer.access_key_id, deployer.secret_access_key, region="us-east-1")

    created = lam.create_function_url_config(FunctionName=name, AuthType="NONE")
    assert created["FunctionUrl"] == f"{server.url}/fn/{name}/", created
    r = httpx.get(created["FunctionUrl"] + "from/boto3", params={"k": "v"}, timeout=TIMEOUT)
    event = event_of(r)
    assert (event["rawPath"], event["queryStringParameters"]) == ("/from/boto3", {"k": "v"}), event
    native = server.request("GET", url_config_path(name))
    assert native.status_code == 200 and native.json()["url"] == created["FunctionUrl"], native.text

    # AWS_IAM: a SigV4-signed request, as on Lambda
    lam.update_function_url_config(FunctionName=name, AuthType="AWS_IAM")
    with never_runs(server, name):
        assert public.get(f"/fn/{name}/iam").status_code in (401, 403)
    r = signed_request(server.url, invoker, "GET", f"/fn/{name}/iam")
    assert event_of(r)["rawPath"] == "/iam"

    lam.delete_function_url_config(FunctionName=name)
    assert public.get(f"/fn/{name}/").status_code == 404

    # and the other way round: a configuration made natively is the Lambda API's too
    native_url = configure_url(server, name, auth_type="NONE")["url"]
    got = lam.get_function_url_config(FunctionName=name)
    assert (got["FunctionUrl"], got["AuthType"]) == (native_url, "NONE"), got


# --- request → event (payload format 2.0) ----------------------------------------------------


def test_event_has_every_payload_2_0_field(server: Server, public: httpx.Client, echo: str) -> None:
    body = '{"greeting": "hi",  "n": [1, 2.5, null]}'
    started = time.time()
    r = public.post(
        f"/fn/{echo}/some/deep/path?a=1&a=2&b=x%20y&c=%2F",
        content=body.encode(),
        headers=[("Content-Type", "application/json"), ("X-Multi", "one"), ("X-Multi", "two"),
                 ("X-Single", "Value With Case"), ("User-Agent", AGENT), ("Cookie", "a=1; b=two")],
    )
    finished = time.time()
    event = event_of(r)
    check_event_shape(event)

    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/some/deep/path"
    assert event["rawQueryString"] == "a=1&a=2&b=x%20y&c=%2F"
    assert event["queryStringParameters"] == {"a": "1,2", "b": "x y", "c": "/"}
    assert event["cookies"] == ["a=1", "b=two"]
    headers = event["headers"]
    assert headers["x-multi"] == "one,two", headers
    assert headers["x-single"] == "Value With Case"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == AGENT
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert "authorization" not in headers
    assert event["body"] == body and event["isBase64Encoded"] is False

    ctx = event["requestContext"]
    assert ctx["http"] == {"method": "POST", "path": "/some/deep/path", "protocol": "HTTP/1.1",
                           "sourceIp": "127.0.0.1", "userAgent": AGENT}, ctx
    assert (ctx["routeKey"], ctx["stage"]) == ("$default", "$default")
    assert ctx["accountId"] and ctx["apiId"] and ctx["domainPrefix"] is not None, ctx
    assert "127.0.0.1" in ctx["domainName"], ctx
    assert started - 5 <= ctx["timeEpoch"] / 1000 <= finished + 5, (started, ctx["timeEpoch"], finished)

    # the call is an invocation like any other: recorded, under the function's request id
    record = wait_record(server, echo, r.headers["x-request-id"])
    assert record["outcome"] == "success", record


def test_event_of_a_bare_request_and_every_method(public: httpx.Client, echo: str) -> None:
    event = event_of(public.get(f"/fn/{echo}/", headers={"User-Agent": AGENT}))
    check_event_shape(event)
    assert (event["rawPath"], event["rawQueryString"]) == ("/", "")
    assert event.get("queryStringParameters") in (None, {}), event
    assert event.get("cookies") in (None, []), event
    assert event.get("body") in (None, "") and event["isBase64Encoded"] is False, event
    assert event["requestContext"]["http"]["method"] == "GET"

    ids = {event["requestContext"]["requestId"]}
    for method in ("POST", "PUT", "PATCH", "DELETE", "GET"):
        event = event_of(public.request(method, f"/fn/{echo}/m/{method.lower()}"))
        check_event_shape(event)
        assert event["requestContext"]["http"]["method"] == method
        assert event["rawPath"] == f"/m/{method.lower()}"
        ids.add(event["requestContext"]["requestId"])
    assert len(ids) == 6, "every request has a requestId of its own"


def test_event_bodies_text_and_base64(public: httpx.Client, echo: str) -> None:
    text = "grüße, 世界 ✓ — line\nbreak"
    event = event_of(public.put(f"/fn/{echo}/text", content=text.encode(),
                                headers={"Content-Type": "text/plain; charset=utf-8"}))
    assert event["body"] == text and event["isBase64Encoded"] is False, event

    png = png_bytes()
    event = event_of(public.post(f"/fn/{echo}/image", content=png, headers={"Content-Type": "image/png"}))
    assert event["isBase64Encoded"] is True, event
    assert base64.b64decode(event["body"]) == png
    assert event["headers"]["content-type"] == "image/png"

    event = event_of(public.post(f"/fn/{echo}/bytes", content=ALL_BYTES,
                                 headers={"Content-Type": "application/octet-stream"}))
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == ALL_BYTES


# --- function result → response --------------------------------------------------------------


def test_response_status_headers_and_body(public: httpx.Client, app: str) -> None:
    r = respond(public, app, {"statusCode": 201, "headers": {"content-type": "text/plain", "x-custom": "yes"},
                              "body": "created it"})
    assert r.status_code == 201 and r.text == "created it", r.text
    assert r.headers["content-type"].startswith("text/plain") and r.headers["x-custom"] == "yes"

    r = respond(public, app, {"statusCode": 404, "headers": {"content-type": "application/json"},
                              "body": json.dumps({"missing": True})})
    assert r.status_code == 404 and r.json() == {"missing": True}

    r = respond(public, app, {"statusCode": 204})
    assert r.status_code == 204 and r.content == b""

    r = respond(public, app, {"statusCode": 302, "headers": {"location": "https://example.com/next"},
                              "body": ""})
    assert r.status_code == 302 and r.headers["location"] == "https://example.com/next"


def test_response_cookies_each_their_own_set_cookie(public: httpx.Client, app: str) -> None:
    cookies = ["session=abc123; Path=/; HttpOnly", "theme=dark; Max-Age=3600", "lang=fr; SameSite=Lax"]
    r = respond(public, app, {"statusCode": 200, "cookies": cookies, "body": "ok"})
    assert r.status_code == 200 and r.text == "ok"
    assert r.headers.get_list("set-cookie") == cookies, r.headers


def test_response_base64_body_is_decoded(public: httpx.Client, app: str) -> None:
    png = png_bytes(5, 4)
    r = respond(public, app, {"statusCode": 200, "headers": {"content-type": "image/png"},
                              "body": base64.b64encode(png).decode(), "isBase64Encoded": True})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == png


def test_result_without_status_code_is_json(public: httpx.Client, app: str) -> None:
    for result in ({"hello": "world", "n": [1, 2, {"deep": None}]}, [1, "two", 3.5], {"body": 5}):
        r = respond(public, app, result)
        assert r.status_code == 200, (result, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), r.headers
        assert r.json() == result


def test_string_result_is_the_body(public: httpx.Client, app: str) -> None:
    r = respond(public, app, "plain words, not JSON")
    assert r.status_code == 200 and r.text == "plain words, not JSON", r.text


def test_binary_bodies_round_trip(public: httpx.Client, app: str) -> None:
    for content, kind in ((png_bytes(7, 3), "image/png"), (ALL_BYTES, "application/octet-stream")):
        r = public.post(f"/fn/{app}/mirror", content=content, headers={"Content-Type": kind})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == kind
        assert r.content == content


def test_node_buffered_response(server: Server, public: httpx.Client) -> None:
    name = deploy_with_url(server, NODE_BUFFERED, runtime="nodejs20", handler="index.handler")
    r = public.get(f"/fn/{name}/node/path", params={"x": "1"})
    assert r.status_code == 202, r.text
    assert r.headers["x-node"] == "yes"
    assert r.headers.get_list("set-cookie") == ["n1=one; Path=/", "n2=two; Secure"]
    assert r.json() == {"rawPath": "/node/path", "query": {"x": "1"}, "method": "GET", "name": name}


# --- failures ---------------------------------------------------------------------------------


def test_function_error_is_502(server: Server, public: httpx.Client, app: str) -> None:
    r = public.get(f"/fn/{app}/fail")
    assert r.status_code == 502, r.text
    assert r.json() == {"message": "Internal Server Error"}
    assert "failed on purpose" not in r.text  # no stack, no message of the function's leaks out
    poll(lambda: records(server, app),
         lambda rs: any(x["outcome"] == "error" and x["error_type"] == "ValueError" for x in rs),
         timeout=TIMEOUT, what="the failed call's record")

    broken = deploy_with_url(server, BROKEN_AT_IMPORT)
    r = public.get(f"/fn/{broken}/")
    assert r.status_code == 502 and r.json() == {"message": "Internal Server Error"}, r.text


def test_timeout_is_504(server: Server, public: httpx.Client) -> None:
    name = deploy_with_url(server, SLEEPER, timeout_sec=2)
    r = public.get(f"/fn/{name}/")
    assert r.status_code == 504, r.text
    poll(lambda: records(server, name), lambda rs: any(x["outcome"] == "timeout" for x in rs),
         timeout=TIMEOUT, what="the timed-out call's record")


def test_throttled_is_429(server: Server, public: httpx.Client) -> None:
    name = deploy_with_url(server, echo_source())
    concurrency = f"/api/v1/functions/{name}/concurrency"
    with never_runs(server, name):
        r = server.request("PUT", concurrency, json={"reserved_concurrency": 0})
        assert r.status_code == 200, r.text
        r = public.get(f"/fn/{name}/")
        assert r.status_code == 429, r.text
        assert server.request("DELETE", concurrency).status_code == 200
    assert public.get(f"/fn/{name}/").status_code == 200


def test_request_body_over_6_mb_is_413(server: Server, public: httpx.Client, echo: str) -> None:
    with never_runs(server, echo):
        r = public.post(f"/fn/{echo}/big", content=b"x" * (6 * 1024 * 1024 + 1),
                        headers={"Content-Type": "text/plain"})
        assert r.status_code == 413, r.text[:500]
    megabyte = "y" * (1024 * 1024)
    event = event_of(public.post(f"/fn/{echo}/fits", content=megabyte.encode(),
                                 headers={"Content-Type": "text/plain"}))
    assert event["body"] == megabyte


def test_invocation_recorded_with_logs(server: Server, public: httpx.Client, app: str) -> None:
    marker = uuid.uuid4().hex
    r = public.get(f"/fn/{app}/print", params={"marker": marker})
    assert r.status_code == 200 and r.text == f"printed {marker}", r.text
    found = poll(lambda: [x for x in records(server, app) if marker in (x["logs"] or "")], bool,
                 timeout=TIMEOUT, what="the record with the call's logs")
    assert found[0]["outcome"] == "success" and f"url-log-line {marker}" in found[0]["logs"], found
    logs = server.request("GET", f"/api/v1/functions/{app}/logs", params={"limit": 100}).json()["logs"]
    assert any(marker in (x["logs"] or "") for x in logs), logs


# --- authentication ---------------------------------------------------------------------------


def test_function_without_url_is_404_and_never_runs(server: Server, public: httpx.Client) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source())["name"]
    with never_runs(server, name):
        for method, path in (("GET", f"/fn/{name}/"), ("POST", f"/fn/{name}/x"), ("GET", f"/fn/{name}:live/"),
                             ("OPTIONS", f"/fn/{name}/")):
            r = public.request(method, path, headers={"Origin": "https://app.example.com",
                                                      "Access-Control-Request-Method": "GET"})
            assert r.status_code == 404, (method, path, r.status_code, r.text)
        r = server.request("GET", f"/fn/{name}/")  # an admin key changes nothing
        assert r.status_code == 404, r.text
    assert public.get("/fn/no-such-function/").status_code == 404


def test_auth_none_needs_no_key(public: httpx.Client, echo: str) -> None:
    event = event_of(public.get(f"/fn/{echo}/open"))
    assert event["rawPath"] == "/open"


def test_auth_key_bearer(server: Server, public: httpx.Client) -> None:
    name = deploy_with_url(server, echo_source(), url={"auth_type": "KEY"})
    read = make_key(server, "read")
    elsewhere = make_key(server, "invoke", functions="other-*")
    revoked = make_key(server, "invoke")
    assert server.request("DELETE", f"/api/v1/keys/{revoked['name']}").status_code == 200
    with never_runs(server, name):
        assert public.get(f"/fn/{name}/").status_code in (401, 403)
        assert public.get(f"/fn/{name}/", headers=bearer("not-a-key")).status_code in (401, 403)
        assert public.get(f"/fn/{name}/", headers=bearer(revoked["key"])).status_code in (401, 403)
        assert public.get(f"/fn/{name}/", headers=bearer(read["key"])).status_code == 403
        assert public.get(f"/fn/{name}/", headers=bearer(elsewhere["key"])).status_code == 403
    for scope in ("invoke", "deploy"):
        key = make_key(server, scope, functions=name)["key"]
        event = event_of(public.post(f"/fn/{name}/keyed", headers=bearer(key), json={"scope": scope}))
        assert event["rawPath"] == "/keyed" and json.loads(event["body"]) == {"scope": scope}


def test_auth_key_sigv4(server: Server, public: httpx.Client) -> None:
    name = deploy_with_url(server, echo_source(), url={"auth_type": "KEY"})
    invoker, reader = sigv4(make_key(server, "invoke")), sigv4(make_key(server, "read"))
    forged = Credentials(invoker.name, "invoke", invoker.access_key_id, invoker.secret_access_key[::-1])
    with never_runs(server, name):
        assert signed_request(server.url, reader, "GET", f"/fn/{name}/signed").status_code == 403
        assert signed_request(server.url, forged, "GET", f"/fn/{name}/signed").status_code in (401, 403)
        assert public.get(f"/fn/{name}/signed").status_code in (401, 403)
    event = event_of(signed_request(server.url, invoker, "GET", f"/fn/{name}/signed"))
    assert event["rawPath"] == "/signed"
    body = b'{"signed": true}'
    event = event_of(signed_request(server.url, invoker, "POST", f"/fn/{name}/signed?x=1", body=body,
                                    headers={"Content-Type": "application/json"}))
    assert (event["rawPath"], event["rawQueryString"], event["body"]) == ("/signed", "x=1", body.decode())


# --- qualifiers --------------------------------------------------------------------------------


def test_alias_url_serves_the_alias(server: Server, public: httpx.Client) -> None:
    name = server.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                         code=echo_source("v1"))["name"]
    assert server.request("POST", f"/api/v1/functions/{name}/versions").json()["version"] == "1"
    r = server.request("POST", f"/api/v1/functions/{name}/aliases",
                       json={"name": "live", "function_version": "1"})
    assert r.status_code == 201, r.text
    r = server.request("PATCH", f"/api/v1/functions/{name}", json={"code": echo_source("v2")})
    assert r.status_code == 200, r.text

    configure_url(server, name, auth_type="NONE")
    alias = configure_url(server, name, auth_type="NONE", qualifier="live")
    assert alias["url"] == f"{server.url}/fn/{name}:live/"
    r = server.request("POST", url_config_path(name), json={"auth_type": "KEY", "qualifier": "live"})
    assert r.status_code == 409, r.text

    latest = public.get(f"/fn/{name}/where")
    assert latest.headers["x-code"] == "v2" and event_of(latest)["rawPath"] == "/where"
    live = public.get(f"/fn/{name}:live/where")
    assert live.headers["x-code"] == "v1" and event_of(live)["rawPath"] == "/where"

    got = server.request("GET", url_config_path(name), params={"qualifier": "live"})
    assert got.status_code == 200 and got.json()["url"] == alias["url"], got.text
    assert server.request("GET", url_config_path(name)).json()["url"] == f"{server.url}/fn/{name}/"
    patched = server.request("PATCH", url_config_path(name), params={"qualifier": "live"},
                             json={"auth_type": "KEY"})
    assert patched.status_code == 200 and patched.json()["auth_type"] == "KEY", patched.text
    assert public.get(f"/fn/{name}:live/").status_code in (401, 403)
    assert public.get(f"/fn/{name}/").status_code == 200  # $LATEST's URL is a record of its own

    assert public.get(f"/fn/{name}:1/").status_code == 404  # no URL for a version
    assert public.get(f"/fn/{name}:nosuch/").status_code == 404
    r = server.request("DELETE", url_config_path(name), params={"qualifier": "live"})
    assert r.status_code in (200, 204), r.text
    assert public.get(f"/fn/{name}:live/").status_code == 404
    assert public.get(f"/fn/{name}/").headers["x-code"] == "v2"


# --- routing by the Host header ----------------------------------------------------------------


def test_host_routing_under_url_domain(make_server: Callable[..., Server]) -> None:
    srv = make_server(env={"IMPULS_URL_DOMAIN": "fn.example.com"})
    name = srv.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                      code=echo_source())["name"]
    r = srv.request("POST", url_config_path(name), json={"auth_type": "NONE"})
    assert r.status_code == 201 and r.json()["url"], r.text
    bare = srv.deploy(name=unique("url"), runtime="python3.11", handler="handler.handler",
                      code=echo_source())["name"]
    host = f"{name}.fn.example.com"
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:  # to 127.0.0.1, whatever the Host
        event = event_of(client.get("/", headers={"Host": host, "User-Agent": AGENT}))
        check_event_shape(event)
        assert (event["rawPath"], event["requestContext"]["http"]["path"]) == ("/", "/")
        assert event["requestContext"]["domainName"] == host
        assert event["requestContext"]["domainPrefix"] == name
        assert event["headers"]["host"] == host

        # the whole path is the app's, /api/... included; the Host may carry the port
        event = event_of(client.get("/api/v1/functions?page=2", headers={"Host": f"{host}:{srv.port}"}))
        assert (event["rawPath"], event["rawQueryString"]) == ("/api/v1/functions", "page=2"), event
        assert event["requestContext"]["domainName"].split(":")[0] == host

        with never_runs(srv, bare):
            assert client.get("/", headers={"Host": f"{bare}.fn.example.com"}).status_code == 404
        assert client.get("/", headers={"Host": "no-such-function.fn.example.com"}).status_code == 404

        # the server's own name still serves the API and the /fn/ paths
        assert event_of(client.get(f"/fn/{name}/by/path"))["rawPath"] == "/by/path"
        assert srv.request("GET", "/api/v1/functions").status_code == 200


# --- CORS -------------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"
CORS = {"allow_origins": [ORIGIN], "allow_methods": ["GET", "POST"], "allow_headers": ["x-custom"],
        "expose_headers": ["x-exposed"], "allow_credentials": True, "max_age": 600}


@pytest.fixture(scope="module")
def cors_echo(server: Server) -> str:
    return deploy_with_url(server, echo_source(), url={"cors": CORS})


def test_cors_preflight_answered_without_the_function(server: Server, public: httpx.Client,
                                                       cors_echo: str) -> None:
    with never_runs(server, cors_echo):
        r = public.options(f"/fn/{cors_echo}/things", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-custom"})
        assert r.status_code in (200, 204), r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in [m.upper() for m in header_list(r.headers["access-control-allow-methods"])]
        assert "x-custom" in header_list(r.headers["access-control-allow-headers"])
        assert r.headers["access-control-allow-credentials"] == "true"
        assert r.headers["access-control-max-age"] == "600"

        r = public.options(f"/fn/{cors_echo}/things", headers={
            "Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers, r.headers


def test_cors_headers_on_responses(public: httpx.Client, cors_echo: str) -> None:
    r = public.get(f"/fn/{cors_echo}/data", headers={"Origin": ORIGIN})
    assert event_of(r)["rawPath"] == "/data"
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "x-exposed" in header_list(r.headers["access-control-expose-headers"])

    r = public.get(f"/fn/{cors_echo}/data", headers={"Origin": "https://evil.example.net"})
    assert r.status_code == 200  # the browser enforces CORS; the function still answers
    assert "access-control-allow-origin" not in r.headers, r.headers


def test_cors_any_origin(server: Server, public: httpx.Client) -> None:
    anything = {"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"]}
    name = deploy_with_url(server, echo_source(), url={"cors": anything})
    origin = "https://anywhere.example.org"
    with never_runs(server, name):
        r = public.options(f"/fn/{name}/", headers={
            "Origin": origin, "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": "x-anything"})
        assert r.status_code in (200, 204), r.text
        assert r.headers["access-control-allow-origin"] in ("*", origin), r.headers
        methods = [m.upper() for m in header_list(r.headers["access-control-allow-methods"])]
        assert "DELETE" in methods or "*" in methods, methods
    r = public.get(f"/fn/{name}/", headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", origin), r.headers


# --- response streaming -----------------------------------------------------------------------


def test_node_stream_status_headers_and_chunks(public: httpx.Client, node_stream: str) -> None:
    r = public.get(f"/fn/{node_stream}/chunks")
    assert r.status_code == 201, r.text
    assert r.headers["x-streamed"] == "yes" and r.headers["content-type"] == "application/octet-stream"
    assert r.content == b"alpha,beta," + bytes([0, 1, 2, 127, 128, 253, 254, 255])

    event = event_of(public.get(f"/fn/{node_stream}/other", params={"x": "1"}))
    check_event_shape(event)
    assert (event["rawPath"], event["rawQueryString"]) == ("/other", "x=1")


def test_node_sse_first_event_before_the_handler_returns(public: httpx.Client, node_stream: str) -> None:
    with public.stream("GET", f"/fn/{node_stream}/sse", headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        events = read_sse(r)
    assert_first_event_before_second_written(events)


def test_python_generator_streams(server: Server, public: httpx.Client) -> None:
    # The Python streaming contract is being designed: PY_STREAM (url_fixtures) is the place to
    # adjust to docs/adding-runtimes.md; the assertions are the contract.
    name = deploy_with_url(server, PY_STREAM, url={"invoke_mode": "RESPONSE_STREAM"})
    with public.stream("GET", f"/fn/{name}/sse") as r:
        assert r.status_code == 200, r.read()
        events = read_sse(r)
    assert_first_event_before_second_written(events)
