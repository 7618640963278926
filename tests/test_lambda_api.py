"""The Lambda door through boto3: Impuls' AWS-Lambda-compatible API, tested as a black box.

The wire is botocore's Lambda service model (rest-json, SigV4); the behaviour is Lambda's as
Impuls promises it: keys and scopes, Lambda's error shapes and status codes, the function name
forms, the operations on functions, Invoke and its headers, the Pending/Active and
InProgress/Successful state machine the waiters poll, versions and aliases with weighted
routing, reserved concurrency, tags, event-invoke and URL configurations, and a clear error
for every operation Impuls does not support.

The main client signs with a ``deploy`` key: every create, update and delete below is also a
test that ``deploy`` may do it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import httpx
import pytest
from botocore import UNSIGNED
from botocore.exceptions import ClientError, WaiterError

from tests.helpers import Server, unique
from tests.lambda_fixtures import (
    ACCOUNT,
    CODE_SIZE_UNZIPPED,
    CODE_SIZE_ZIPPED,
    HANDLER,
    PYTHON,
    REGION,
    ROLE,
    LambdaDoor,
    client_config,
    code_of,
    code_sha256,
    create_function,
    download,
    function_arn,
    invoke,
    lambda_client,
    lambda_error,
    make_credentials,
    poll,
    python_zip,
    status_of,
    versioned_source,
    wait_active,
    wait_updated,
    wait_version_active,
    zip_bytes,
)

ECHO = """
import json, os, sys, time

def lambda_handler(event, context):
    event = event if isinstance(event, dict) else {"value": event}
    if "print" in event:
        print(event["print"], flush=True)
    if "sleep" in event:
        time.sleep(event["sleep"])
    if "exit" in event:
        sys.stdout.flush()
        os._exit(event["exit"])
    if "fail" in event:
        raise ValueError(event["fail"])
    if "return" in event:
        return event["return"]
    custom = context.client_context.custom if context.client_context is not None else None
    return {"event": event, "greeting": os.environ.get("GREETING"), "keep": os.environ.get("KEEP"),
            "memory": int(context.memory_limit_in_mb), "name": context.function_name,
            "arn": context.invoked_function_arn, "custom": custom}
"""

# A custom runtime (``provided``): the Runtime API by hand, with urllib.
BOOTSTRAP = """#!/usr/bin/python3
import json, os, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
while True:
    with urllib.request.urlopen(api + "next") as resp:
        rid = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        event = json.loads(resp.read())
    body = {"custom": event, "handler": os.environ["_HANDLER"]}
    urllib.request.urlopen(urllib.request.Request(api + rid + "/response", data=json.dumps(body).encode(),
                                                  method="POST"))
"""

NODE_ECHO = """
exports.handler = async (event, context) => ({node: true, event, name: context.functionName});
"""


@pytest.fixture(scope="module")
def door(server: Server) -> LambdaDoor:
    return LambdaDoor(server)


@pytest.fixture(scope="module")
def lam(door: LambdaDoor) -> Any:
    """boto3's Lambda client, signed with a ``deploy`` key."""
    return door.client("deploy")


@pytest.fixture(scope="module")
def echo(lam: Any) -> str:
    """An active Python function shared by the read-only and invoke tests."""
    return create_function(lam, python_zip(ECHO), name=unique("echo"),
                           Environment={"Variables": {"GREETING": "hello"}})


@pytest.fixture(scope="module")
def two_versions(lam: Any) -> str:
    """A function whose version 1 answers "one", version 2 "two" and $LATEST "latest"."""
    name = create_function(lam, python_zip(versioned_source("one")), name=unique("versions"))
    assert lam.publish_version(FunctionName=name)["Version"] == "1"
    lam.update_function_code(FunctionName=name, ZipFile=python_zip(versioned_source("two")))
    wait_updated(lam, name)
    assert lam.publish_version(FunctionName=name)["Version"] == "2"
    lam.update_function_code(FunctionName=name, ZipFile=python_zip(versioned_source("latest")))
    wait_updated(lam, name)
    for version in ("1", "2"):
        wait_version_active(lam, name, version)
    return name


def config_of(resp: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resp.items() if k != "ResponseMetadata"}


# --- authentication and scopes ---------------------------------------------------------------


def test_unsigned_requests_are_refused_with_a_lambda_error(door: LambdaDoor) -> None:
    r = httpx.get(door.url + "/2015-03-31/functions", timeout=30)
    assert r.status_code == 403, r.text
    assert r.headers.get("x-amzn-ErrorType"), dict(r.headers)
    doc = r.json()
    assert doc.get("message") or doc.get("Message"), doc

    unsigned = boto3.client("lambda", endpoint_url=door.url, region_name=REGION,
                            config=client_config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as info:
        unsigned.list_functions()
    assert status_of(info.value) == 403
    assert code_of(info.value).endswith("Exception"), info.value.response


def test_unknown_access_key_id_is_unrecognized(door: LambdaDoor) -> None:
    stranger = lambda_client(door.url, "AKIAIMPULSUNKNOWN000", "x" * 40)
    with lambda_error(stranger, "UnrecognizedClientException", 403):
        stranger.list_functions()


def test_wrong_secret_is_an_invalid_signature(door: LambdaDoor) -> None:
    creds = door.creds("read")
    forger = lambda_client(door.url, creds.access_key_id, creds.secret_access_key[::-1] + "x")
    with lambda_error(forger, "InvalidSignatureException", 403):
        forger.list_functions()
    assert door.client("read").list_functions()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_revoked_key_stops_working(door: LambdaDoor) -> None:
    creds = make_credentials(door.server, "read")
    client = lambda_client(door.url, creds.access_key_id, creds.secret_access_key)
    client.list_functions()
    r = door.server.request("DELETE", f"/api/v1/keys/{creds.name}")
    assert r.status_code == 200, r.text
    with lambda_error(client, "UnrecognizedClientException", 403):
        client.list_functions()


def test_read_scope_may_look_but_not_change_or_invoke(door: LambdaDoor, lam: Any, echo: str) -> None:
    reader = door.client("read")
    assert reader.get_function(FunctionName=echo)["Configuration"]["FunctionName"] == echo
    assert reader.get_function_configuration(FunctionName=echo)["FunctionName"] == echo
    assert echo in [f["FunctionName"] for f in reader.get_paginator("list_functions").paginate()
                    .build_full_result()["Functions"]]
    reader.get_account_settings()

    denied = [
        lambda: reader.create_function(FunctionName=unique("nope"), Runtime=PYTHON, Role=ROLE,
                                       Handler=HANDLER, Code={"ZipFile": python_zip(ECHO)}),
        lambda: reader.invoke(FunctionName=echo, Payload=b"{}"),
        lambda: reader.update_function_configuration(FunctionName=echo, Description="read key was here"),
        lambda: reader.update_function_code(FunctionName=echo, ZipFile=python_zip(ECHO)),
        lambda: reader.publish_version(FunctionName=echo),
        lambda: reader.put_function_concurrency(FunctionName=echo, ReservedConcurrentExecutions=1),
        lambda: reader.delete_function(FunctionName=echo),
    ]
    for call in denied:
        with lambda_error(reader, "AccessDeniedException", 403):
            call()
    config = lam.get_function(FunctionName=echo)
    assert config["Configuration"]["Description"] != "read key was here"
    assert "Concurrency" not in config or config["Concurrency"].get("ReservedConcurrentExecutions") != 1
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=echo)["Versions"]] == ["$LATEST"]


def test_invoke_scope_may_invoke_but_not_deploy(door: LambdaDoor, echo: str) -> None:
    invoker = door.client("invoke")
    resp, payload = invoke(invoker, echo, {"return": "invoked"})
    assert resp["StatusCode"] == 200 and payload == "invoked"
    assert invoker.get_function(FunctionName=echo)["Configuration"]["FunctionName"] == echo
    with lambda_error(invoker, "AccessDeniedException", 403):
        invoker.create_function(FunctionName=unique("nope"), Runtime=PYTHON, Role=ROLE, Handler=HANDLER,
                                Code={"ZipFile": python_zip(ECHO)})
    with lambda_error(invoker, "AccessDeniedException", 403):
        invoker.update_function_code(FunctionName=echo, ZipFile=python_zip(ECHO))
    with lambda_error(invoker, "AccessDeniedException", 403):
        invoker.delete_function(FunctionName=echo)
    assert invoker.get_function(FunctionName=echo)["Configuration"]["FunctionName"] == echo


def test_key_limited_to_a_glob_sees_only_its_functions(door: LambdaDoor, lam: Any) -> None:
    prefix = unique("glob")
    mine = create_function(lam, python_zip(ECHO), name=f"{prefix}-mine", wait=False)
    other = create_function(lam, python_zip(ECHO), name=unique("other"), wait=False)
    creds = make_credentials(door.server, "deploy", functions=f"{prefix}-*")
    limited = lambda_client(door.url, creds.access_key_id, creds.secret_access_key)
    assert limited.get_function(FunctionName=mine)["Configuration"]["FunctionName"] == mine
    with lambda_error(limited, "AccessDeniedException", 403):
        limited.get_function(FunctionName=other)
    with lambda_error(limited, "AccessDeniedException", 403):
        limited.delete_function(FunctionName=other)
    names = [f["FunctionName"] for f in
             limited.get_paginator("list_functions").paginate().build_full_result()["Functions"]]
    assert mine in names and all(n.startswith(f"{prefix}-") for n in names), names


# --- errors ----------------------------------------------------------------------------------


def test_errors_have_lambdas_shape_on_the_wire(door: LambdaDoor, echo: str) -> None:
    duplicate = json.dumps({"FunctionName": echo, "Runtime": PYTHON, "Role": ROLE, "Handler": HANDLER,
                            "Code": {"ZipFile": base64.b64encode(python_zip(ECHO)).decode()}}).encode()
    for method, path, body, status, code in (
            ("GET", f"/2015-03-31/functions/{unique('missing')}", b"", 404, "ResourceNotFoundException"),
            ("POST", "/2015-03-31/functions", duplicate, 409, "ResourceConflictException")):
        r = door.signed(method, path, body, headers={"Content-Type": "application/json"} if body else None)
        assert r.status_code == status, r.text
        assert r.headers["x-amzn-ErrorType"].split(":")[0] == code, dict(r.headers)
        assert r.headers["content-type"].startswith("application/json"), dict(r.headers)
        doc = r.json()
        assert doc["Type"] == "User", doc
        assert isinstance(doc["message"], str) and doc["message"], doc
        assert isinstance(doc["Message"], str) and doc["Message"], doc

    r = door.signed("POST", "/2015-03-31/functions", body=b"{not json", headers={"Content-Type":
                                                                                   "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.headers.get("x-amzn-ErrorType"), dict(r.headers)
    assert r.json().get("message") or r.json().get("Message"), r.text


def test_not_found_and_conflict(lam: Any, echo: str) -> None:
    missing = unique("missing")
    for call in (lambda: lam.get_function(FunctionName=missing),
                 lambda: lam.get_function_configuration(FunctionName=missing),
                 lambda: lam.invoke(FunctionName=missing, Payload=b"{}"),
                 lambda: lam.update_function_configuration(FunctionName=missing, Description="x"),
                 lambda: lam.delete_function(FunctionName=missing),
                 lambda: lam.invoke(FunctionName=f"{echo}:99", Payload=b"{}"),
                 lambda: lam.get_function(FunctionName=echo, Qualifier="no-such-alias")):
        with lambda_error(lam, "ResourceNotFoundException", 404):
            call()
    with lambda_error(lam, "ResourceConflictException", 409):
        lam.create_function(FunctionName=echo, Runtime=PYTHON, Role=ROLE, Handler=HANDLER,
                            Code={"ZipFile": python_zip(ECHO)})
    assert lam.get_function(FunctionName=echo)["Configuration"]["Environment"]["Variables"] == {
        "GREETING": "hello"}


@pytest.mark.parametrize(("field", "value"), [
    ("Timeout", 901),
    ("MemorySize", 10241),
    ("Environment", {"Variables": {"AWS_LAMBDA_FUNCTION_NAME": "reserved"}}),
    ("Code", {"ZipFile": b"this is not a zip archive"}),
], ids=["timeout", "memory", "reserved-env", "not-a-zip"])
def test_invalid_parameters_are_400_and_create_nothing(lam: Any, field: str, value: Any) -> None:
    name = unique("invalid")
    params: dict[str, Any] = {"FunctionName": name, "Runtime": PYTHON, "Role": ROLE, "Handler": HANDLER,
                              "Code": {"ZipFile": python_zip(ECHO)}, field: value}
    with lambda_error(lam, "InvalidParameterValueException", 400):
        lam.create_function(**params)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_function(FunctionName=name)


# --- creating and reading functions ----------------------------------------------------------


def test_create_function_stores_and_returns_every_field(lam: Any) -> None:
    name = unique("create")
    code = python_zip(ECHO, **{"data/note.txt": f"unique {name}"})
    tags = {"team": "impuls", "purpose": "acceptance"}
    created = lam.create_function(
        FunctionName=name, Runtime=PYTHON, Role=ROLE, Handler=HANDLER, Code={"ZipFile": code},
        Description="made by boto3", Timeout=17, MemorySize=256, EphemeralStorage={"Size": 1024},
        Environment={"Variables": {"GREETING": "bonjour", "KEEP": "kept"}}, Tags=tags)
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    expected = {"FunctionName": name, "FunctionArn": function_arn(name), "Runtime": PYTHON, "Role": ROLE,
                "Handler": HANDLER, "Description": "made by boto3", "Timeout": 17, "MemorySize": 256,
                "CodeSha256": code_sha256(code), "CodeSize": len(code), "Version": "$LATEST",
                "EphemeralStorage": {"Size": 1024},
                "Environment": {"Variables": {"GREETING": "bonjour", "KEEP": "kept"}}}
    for key, value in expected.items():
        assert created.get(key) == value, (key, created)
    assert created["State"] in ("Pending", "Active"), created
    assert created["RevisionId"] and created["LastModified"], created

    wait_active(lam, name)
    got = lam.get_function(FunctionName=name)
    config = got["Configuration"]
    for key, value in expected.items():
        assert config.get(key) == value, (key, config)
    assert config["State"] == "Active" and config["LastUpdateStatus"] == "Successful", config
    assert got["Tags"] == tags
    assert lam.list_tags(Resource=function_arn(name))["Tags"] == tags
    assert config_of(lam.get_function_configuration(FunctionName=name)) == config

    # the code comes back from Code.Location, fetched with no credentials
    assert download(got["Code"]["Location"]) == code

    resp, payload = invoke(lam, name, {"hi": 1})
    assert resp["StatusCode"] == 200 and "FunctionError" not in resp, resp
    assert payload["greeting"] == "bonjour" and payload["keep"] == "kept" and payload["memory"] == 256
    assert payload["name"] == name and payload["event"] == {"hi": 1}


def test_other_runtimes_nodejs_and_custom(lam: Any) -> None:
    node = create_function(lam, zip_bytes({"index.js": NODE_ECHO}), runtime="nodejs20.x",
                           handler="index.handler")
    assert lam.get_function_configuration(FunctionName=node)["Runtime"] == "nodejs20.x"
    resp, payload = invoke(lam, node, {"n": 1})
    assert resp["StatusCode"] == 200 and payload == {"node": True, "event": {"n": 1}, "name": node}

    custom = create_function(lam, zip_bytes({"bootstrap": BOOTSTRAP}, executable=["bootstrap"]),
                             runtime="provided.al2023", handler="function.handler")
    assert lam.get_function_configuration(FunctionName=custom)["Runtime"] == "provided.al2023"
    resp, payload = invoke(lam, custom, {"c": 2})
    assert resp["StatusCode"] == 200 and payload == {"custom": {"c": 2}, "handler": "function.handler"}


def test_function_name_forms(lam: Any, two_versions: str) -> None:
    name = two_versions
    arn = function_arn(name)
    for ref in (name, f"{ACCOUNT}:function:{name}", arn):
        config = lam.get_function_configuration(FunctionName=ref)
        assert config["FunctionName"] == name and config["FunctionArn"] == arn, (ref, config)
        assert lam.get_function(FunctionName=ref)["Configuration"]["FunctionArn"] == arn
        resp, payload = invoke(lam, ref)
        assert resp["ExecutedVersion"] == "$LATEST" and payload["value"] == "latest", ref
    for ref, version, value in ((f"{name}:1", "1", "one"), (f"{arn}:2", "2", "two"),
                                (f"{ACCOUNT}:function:{name}:1", "1", "one"),
                                (f"{name}:$LATEST", "$LATEST", "latest"),
                                (f"{arn}:$LATEST", "$LATEST", "latest")):
        config = lam.get_function_configuration(FunctionName=ref)
        assert config["FunctionName"] == name and config["Version"] == version, (ref, config)
        resp, payload = invoke(lam, ref)
        assert resp["ExecutedVersion"] == version and payload["value"] == value, (ref, resp, payload)


def test_arns_carry_the_requests_region(door: LambdaDoor, lam: Any) -> None:
    eu = door.client("deploy", region="eu-west-1")
    name = unique("eu")
    created = eu.create_function(FunctionName=name, Runtime=PYTHON, Role=ROLE, Handler=HANDLER,
                                 Code={"ZipFile": python_zip(ECHO)})
    assert created["FunctionArn"] == function_arn(name, "eu-west-1")
    wait_active(eu, name)
    config = eu.get_function(FunctionName=function_arn(name, "eu-west-1"))["Configuration"]
    assert config["FunctionArn"] == function_arn(name, "eu-west-1")
    listed = {f["FunctionName"]: f["FunctionArn"]
              for f in eu.get_paginator("list_functions").paginate().build_full_result()["Functions"]}
    assert listed[name] == function_arn(name, "eu-west-1")
    resp, payload = invoke(eu, name)
    assert resp["StatusCode"] == 200, resp
    assert payload["arn"] == function_arn(name, "eu-west-1"), \
        f"context.invoked_function_arn is {payload['arn']}, not the ARN of the request's region"
    # one namespace of functions: the same function seen from us-east-1 has a us-east-1 ARN
    assert lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"] == function_arn(name)


def test_list_functions_pagination(lam: Any) -> None:
    prefix = unique("page")
    ours = [create_function(lam, python_zip(ECHO), name=f"{prefix}-{i}", wait=False) for i in range(3)]

    seen: list[str] = []
    marker: str | None = None
    for _ in range(10000):
        page = lam.list_functions(MaxItems=2, **({"Marker": marker} if marker else {}))
        assert len(page["Functions"]) <= 2, page
        seen += [f["FunctionName"] for f in page["Functions"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    assert len(seen) == len(set(seen)), seen
    assert set(ours) <= set(seen), (ours, seen)

    pages = list(lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 1}))
    assert all(len(p["Functions"]) <= 1 for p in pages)
    by_paginator = [f["FunctionName"] for p in pages for f in p["Functions"]]
    assert sorted(by_paginator) == sorted(seen)
    for f in lam.get_paginator("list_functions").paginate().build_full_result()["Functions"]:
        if f["FunctionName"] in ours:
            assert f["Runtime"] == PYTHON and f["Handler"] == HANDLER and f["Role"] == ROLE, f
            assert f["FunctionArn"] == function_arn(f["FunctionName"]), f


# --- updating and deleting -------------------------------------------------------------------


def test_update_function_code_with_revision_ids_and_publish(lam: Any) -> None:
    old = python_zip(versioned_source("old"))
    name = create_function(lam, old)
    revision = lam.get_function_configuration(FunctionName=name)["RevisionId"]

    new = python_zip(versioned_source("new"))
    updated = lam.update_function_code(FunctionName=name, ZipFile=new, RevisionId=revision)
    assert updated["CodeSha256"] == code_sha256(new) and updated["CodeSize"] == len(new), updated
    assert updated["LastUpdateStatus"] in ("InProgress", "Successful"), updated
    wait_updated(lam, name)
    config = lam.get_function_configuration(FunctionName=name)
    assert config["CodeSha256"] == code_sha256(new) and config["RevisionId"] != revision
    assert invoke(lam, name)[1]["value"] == "new"
    assert download(lam.get_function(FunctionName=name)["Code"]["Location"]) == new

    # a stale RevisionId is refused and changes nothing
    with lambda_error(lam, "PreconditionFailedException", 412):
        lam.update_function_code(FunctionName=name, ZipFile=python_zip(versioned_source("stale")),
                                 RevisionId=revision)
    with lambda_error(lam, "PreconditionFailedException", 412):
        lam.update_function_configuration(FunctionName=name, Description="stale", RevisionId=revision)
    assert invoke(lam, name)[1]["value"] == "new"
    assert lam.get_function_configuration(FunctionName=name)["Description"] != "stale"

    # Publish=True makes a version of the new code
    newer = python_zip(versioned_source("newer"))
    lam.update_function_code(FunctionName=name, ZipFile=newer, Publish=True)
    wait_updated(lam, name)
    versions = lam.list_versions_by_function(FunctionName=name)["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST", "1"], versions
    assert versions[1]["CodeSha256"] == code_sha256(newer)
    wait_version_active(lam, name, "1")
    resp, payload = invoke(lam, name, Qualifier="1")
    assert resp["ExecutedVersion"] == "1" and payload["value"] == "newer"


def test_update_function_configuration(lam: Any) -> None:
    code = python_zip(ECHO, **{"other.py": "def handler(event, context):\n    return 'other handler'\n"})
    name = create_function(lam, code, Description="before", MemorySize=128, Timeout=3,
                           Environment={"Variables": {"GREETING": "hello", "KEEP": "kept"}})
    assert invoke(lam, name)[1]["keep"] == "kept"

    updated = lam.update_function_configuration(
        FunctionName=name, Description="after", MemorySize=512, Timeout=10,
        Environment={"Variables": {"GREETING": "changed"}}, EphemeralStorage={"Size": 2048})
    assert updated["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert updated["LastUpdateStatus"] in ("InProgress", "Successful"), updated
    wait_updated(lam, name)
    config = lam.get_function_configuration(FunctionName=name)
    assert (config["Description"], config["MemorySize"], config["Timeout"]) == ("after", 512, 10), config
    assert config["Environment"]["Variables"] == {"GREETING": "changed"}, config  # replaced, not merged
    assert config["EphemeralStorage"] == {"Size": 2048}
    assert (config["Runtime"], config["Handler"], config["Role"]) == (PYTHON, HANDLER, ROLE), config
    assert config["CodeSha256"] == code_sha256(code)
    payload = invoke(lam, name)[1]
    assert (payload["greeting"], payload["keep"], payload["memory"]) == ("changed", None, 512), payload

    lam.update_function_configuration(FunctionName=name, Handler="other.handler")
    wait_updated(lam, name)
    assert invoke(lam, name)[1] == "other handler"


def test_delete_function(lam: Any) -> None:
    name = create_function(lam, python_zip(ECHO))
    invoke(lam, name)
    lam.delete_function(FunctionName=name)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_function(FunctionName=name)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.invoke(FunctionName=name, Payload=b"{}")
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.delete_function(FunctionName=name)
    names = [f["FunctionName"] for f in
             lam.get_paginator("list_functions").paginate().build_full_result()["Functions"]]
    assert name not in names
    # the name is free again
    create_function(lam, python_zip(ECHO), name=name, wait=False)


def test_account_settings(lam: Any) -> None:
    def count() -> int:
        return len(lam.get_paginator("list_functions").paginate().build_full_result()["Functions"])

    settings = lam.get_account_settings()
    limit, usage = settings["AccountLimit"], settings["AccountUsage"]
    assert usage["FunctionCount"] == count(), settings
    assert usage["TotalCodeSize"] >= 0
    assert limit["CodeSizeZipped"] == CODE_SIZE_ZIPPED and limit["CodeSizeUnzipped"] == CODE_SIZE_UNZIPPED
    assert limit["ConcurrentExecutions"] > 0, settings
    assert 0 <= limit.get("UnreservedConcurrentExecutions", 0) <= limit["ConcurrentExecutions"], settings
    create_function(lam, python_zip(ECHO), wait=False)
    assert lam.get_account_settings()["AccountUsage"]["FunctionCount"] == usage["FunctionCount"] + 1


# --- invoking --------------------------------------------------------------------------------


def test_invoke_request_response(lam: Any, echo: str) -> None:
    resp, payload = invoke(lam, echo, {"k": [1, 2], "s": "x"})
    assert resp["StatusCode"] == 200 and resp["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert resp["ExecutedVersion"] == "$LATEST" and "FunctionError" not in resp, resp
    assert "LogResult" not in resp, resp
    assert payload["event"] == {"k": [1, 2], "s": "x"} and payload["greeting"] == "hello"
    assert payload["arn"] == function_arn(echo), payload
    # the body is the raw result, nothing wrapped around it
    for result in ("hello", None, [1, "two", {"3": 4}], 7.5):
        resp, _ = invoke(lam, echo, {"return": result}, InvocationType="RequestResponse")
        assert json.loads(resp["RawPayload"]) == result, resp["RawPayload"]


def test_function_error_is_200_with_lambdas_error_document(lam: Any, echo: str) -> None:
    resp, payload = invoke(lam, echo, {"fail": "broken on purpose"})
    assert resp["StatusCode"] == 200 and resp["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled", resp
    assert payload["errorMessage"] == "broken on purpose" and payload["errorType"] == "ValueError", payload
    assert isinstance(payload["stackTrace"], list) and payload["stackTrace"], payload
    assert invoke(lam, echo, {"return": "still fine"})[1] == "still fine"


def test_timeout_and_crash_are_function_errors_too(lam: Any) -> None:
    name = create_function(lam, python_zip(ECHO), Timeout=1)
    resp, payload = invoke(lam, name, {"sleep": 5})
    assert resp["StatusCode"] == 200 and resp["FunctionError"] == "Unhandled", resp
    assert "time" in (payload.get("errorMessage", "") + payload.get("errorType", "")).lower(), payload
    resp, payload = invoke(lam, name, {"print": "about to exit", "exit": 3})
    assert resp["StatusCode"] == 200 and resp["FunctionError"] == "Unhandled", resp
    assert payload["errorType"] and payload["errorMessage"], payload
    assert invoke(lam, name, {"return": "recovered"})[1] == "recovered"


def test_invoke_event_is_202_and_runs_in_the_background(door: LambdaDoor, lam: Any, echo: str) -> None:
    marker = f"event-{unique('m')}"
    resp, payload = invoke(lam, echo, {"print": marker}, InvocationType="Event")
    assert resp["StatusCode"] == 202 and resp["ResponseMetadata"]["HTTPStatusCode"] == 202, resp
    assert payload is None
    poll(lambda: [r for r in door.records(echo) if marker in (r.get("logs") or "")], bool,
         what=f"an invocation record with {marker}")


def test_invoke_dry_run_is_204(lam: Any, echo: str) -> None:
    resp, payload = invoke(lam, echo, {"print": "never"}, InvocationType="DryRun")
    assert resp["StatusCode"] == 204 and resp["ResponseMetadata"]["HTTPStatusCode"] == 204, resp
    assert payload is None
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.invoke(FunctionName=unique("missing"), InvocationType="DryRun")


def test_log_type_tail_is_the_last_4kb_of_logs(lam: Any, echo: str) -> None:
    marker = unique("tail")
    resp, payload = invoke(lam, echo, {"print": f"hello from {marker}", "return": 1}, LogType="Tail")
    assert payload == 1
    assert f"hello from {marker}" in base64.b64decode(resp["LogResult"]).decode(errors="replace")

    text = f"FIRST-{marker} " + "x" * 6000 + f" LAST-{marker}"
    resp, _ = invoke(lam, echo, {"print": text, "return": 2}, LogType="Tail")
    tail = base64.b64decode(resp["LogResult"])
    assert len(tail) <= 4096, len(tail)
    assert f"LAST-{marker}".encode() in tail and f"FIRST-{marker}".encode() not in tail

    resp, payload = invoke(lam, echo, {"fail": marker}, LogType="Tail")
    assert resp["FunctionError"] == "Unhandled" and "LogResult" in resp


def test_client_context_reaches_the_function(lam: Any, echo: str) -> None:
    custom = {"tenant": "acme", "n": 3, "nested": {"ok": True}}
    context = {"custom": custom, "env": {"locale": "fr_FR"}, "client": {"app_title": "impuls-tests"}}
    encoded = base64.b64encode(json.dumps(context).encode()).decode()
    _, payload = invoke(lam, echo, {}, ClientContext=encoded)
    assert payload["custom"] == custom, payload
    assert invoke(lam, echo, {})[1]["custom"] is None


def test_payload_over_6mb_is_request_too_large(lam: Any, echo: str) -> None:
    with lambda_error(lam, "RequestTooLargeException", 413):
        lam.invoke(FunctionName=echo, Payload=json.dumps({"big": "x" * (6 * 1024 * 1024 + 1)}).encode())
    assert invoke(lam, echo, {"return": "ok"})[1] == "ok"


# --- the state machine -----------------------------------------------------------------------


def test_failed_build_sets_state_failed(lam: Any) -> None:
    name = unique("failed")
    created = lam.create_function(FunctionName=name, Runtime="provided", Role=ROLE,
                                  Handler="function.handler",
                                  Code={"ZipFile": zip_bytes({"main.sh": "echo no bootstrap here\n"})})
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert created["State"] in ("Pending", "Failed"), created
    with pytest.raises(WaiterError) as info:
        wait_active(lam, name)
    config = lam.get_function(FunctionName=name)["Configuration"]
    assert config["State"] == "Failed", (config, info.value)
    assert config["StateReason"] and config["StateReasonCode"], config


def test_failed_update_and_recovery(lam: Any) -> None:
    name = create_function(lam, zip_bytes({"bootstrap": BOOTSTRAP}, executable=["bootstrap"]),
                           runtime="provided.al2", handler="function.handler")
    assert invoke(lam, name, {"v": 1})[1] == {"custom": {"v": 1}, "handler": "function.handler"}

    lam.update_function_code(FunctionName=name, ZipFile=zip_bytes({"main.sh": "echo no bootstrap\n"}))
    with pytest.raises(WaiterError):
        wait_updated(lam, name)
    config = lam.get_function(FunctionName=name)["Configuration"]
    assert config["LastUpdateStatus"] == "Failed", config
    assert config["LastUpdateStatusReason"], config
    # the function keeps serving its last good package
    assert invoke(lam, name, {"v": 2})[1] == {"custom": {"v": 2}, "handler": "function.handler"}

    lam.update_function_code(FunctionName=name, ZipFile=zip_bytes({"bootstrap": BOOTSTRAP},
                                                                  executable=["bootstrap"]))
    wait_updated(lam, name)
    assert lam.get_function(FunctionName=name)["Configuration"]["LastUpdateStatus"] == "Successful"


def test_a_change_while_an_update_is_in_progress_is_a_conflict(lam: Any) -> None:
    """UpdateFunctionCode with a package of thousands of files (its build takes a while), then at
    once another change.  The build being slower than one loopback request is the only thing
    assumed; five tries, each with a fresh package, leave no room for luck."""
    name = create_function(lam, python_zip(versioned_source("base")))
    conflict = None
    for attempt in range(5):
        files: dict[str, str | bytes] = {f"data/{i:05d}.bin": os.urandom(2048) for i in range(4000)}
        files["lambda_function.py"] = versioned_source(f"big-{attempt}")
        update = lam.update_function_code(FunctionName=name, ZipFile=zip_bytes(files))
        assert update["LastUpdateStatus"] in ("InProgress", "Successful"), update
        try:
            lam.update_function_configuration(FunctionName=name, Description=f"during-{attempt}")
        except lam.exceptions.ResourceConflictException as err:
            conflict = err
        wait_updated(lam, name)
        if conflict is not None:
            assert status_of(conflict) == 409, conflict.response
            config = lam.get_function_configuration(FunctionName=name)
            assert config["Description"] != f"during-{attempt}", config  # the refused change left no trace
            assert invoke(lam, name)[1]["value"] == f"big-{attempt}"
            break
    assert conflict is not None, "no change was ever refused while an update was in progress"


# --- versions and aliases --------------------------------------------------------------------


def test_published_versions_are_immutable(lam: Any) -> None:
    first = python_zip(versioned_source("one"))
    name = create_function(lam, first, Description="latest description",
                           Environment={"Variables": {"GREETING": "first"}})
    v1 = lam.publish_version(FunctionName=name, Description="first release")
    assert v1["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert (v1["Version"], v1["FunctionArn"]) == ("1", function_arn(name, qualifier="1")), v1
    assert v1["CodeSha256"] == code_sha256(first) and v1["Description"] == "first release", v1
    wait_version_active(lam, name, "1")

    second = python_zip(versioned_source("two"))
    lam.update_function_code(FunctionName=name, ZipFile=second)
    wait_updated(lam, name)
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"GREETING": "second"}})
    wait_updated(lam, name)
    v2 = lam.publish_version(FunctionName=name, Description="second release")
    assert v2["Version"] == "2" and v2["CodeSha256"] == code_sha256(second), v2
    wait_version_active(lam, name, "2")

    resp, payload = invoke(lam, f"{name}:1")  # a warm instance of version 1 from here on
    assert resp["ExecutedVersion"] == "1" and payload == {"value": "one", "greeting": "first"}

    latest = python_zip(versioned_source("three"))
    lam.update_function_code(FunctionName=name, ZipFile=latest)
    wait_updated(lam, name)
    lam.update_function_configuration(FunctionName=name, MemorySize=256,
                                      Environment={"Variables": {"GREETING": "third"}})
    wait_updated(lam, name)

    for ref, kw, version, expected in ((f"{name}:1", {}, "1", ("one", "first")),
                                       (name, {"Qualifier": "1"}, "1", ("one", "first")),
                                       (function_arn(name, qualifier="2"), {}, "2", ("two", "second")),
                                       (f"{name}:$LATEST", {}, "$LATEST", ("three", "third")),
                                       (name, {}, "$LATEST", ("three", "third"))):
        resp, payload = invoke(lam, ref, **kw)
        assert resp["ExecutedVersion"] == version, (ref, kw, resp)
        assert (payload["value"], payload["greeting"]) == expected, (ref, kw, payload)

    c1 = lam.get_function_configuration(FunctionName=name, Qualifier="1")
    assert (c1["Version"], c1["FunctionArn"]) == ("1", function_arn(name, qualifier="1")), c1
    assert c1["CodeSha256"] == code_sha256(first) and c1["MemorySize"] == 128, c1
    assert c1["Environment"]["Variables"] == {"GREETING": "first"} and c1["Description"] == "first release"
    assert download(lam.get_function(FunctionName=f"{name}:1")["Code"]["Location"]) == first
    assert download(lam.get_function(FunctionName=name, Qualifier="2")["Code"]["Location"]) == second
    assert lam.get_function_configuration(FunctionName=name)["MemorySize"] == 256

    versions = lam.get_paginator("list_versions_by_function").paginate(
        FunctionName=name, PaginationConfig={"PageSize": 1}).build_full_result()["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST", "1", "2"], versions
    assert [v["CodeSha256"] for v in versions] == [code_sha256(latest), code_sha256(first),
                                                   code_sha256(second)]
    assert versions[1]["Description"] == "first release"


def test_publish_on_create(lam: Any) -> None:
    name = create_function(lam, python_zip(versioned_source("one")), Publish=True)
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]] == [
        "$LATEST", "1"]
    wait_version_active(lam, name, "1")
    resp, payload = invoke(lam, name, Qualifier="1")
    assert resp["ExecutedVersion"] == "1" and payload["value"] == "one"


def test_alias_lifecycle(lam: Any, two_versions: str) -> None:
    name = two_versions
    alias = unique("prod")
    created = lam.create_alias(FunctionName=name, Name=alias, FunctionVersion="1", Description="production")
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert created["AliasArn"] == function_arn(name, qualifier=alias), created
    assert (created["Name"], created["FunctionVersion"], created["Description"]) == (alias, "1", "production")
    assert created["RevisionId"]
    got = lam.get_alias(FunctionName=name, Name=alias)
    assert config_of(got) == config_of(created)

    for ref, kw in ((f"{name}:{alias}", {}), (name, {"Qualifier": alias}),
                    (function_arn(name, qualifier=alias), {})):
        resp, payload = invoke(lam, ref, **kw)
        assert resp["ExecutedVersion"] == "1" and payload["value"] == "one", (ref, kw, resp)
    assert lam.get_function_configuration(FunctionName=name, Qualifier=alias)["Version"] == "1"

    with lambda_error(lam, "ResourceConflictException", 409):
        lam.create_alias(FunctionName=name, Name=alias, FunctionVersion="2")
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.create_alias(FunctionName=name, Name=unique("ghost"), FunctionVersion="42")

    moved = lam.update_alias(FunctionName=name, Name=alias, FunctionVersion="2", Description="moved",
                             RevisionId=got["RevisionId"])
    assert (moved["FunctionVersion"], moved["Description"]) == ("2", "moved"), moved
    with lambda_error(lam, "PreconditionFailedException", 412):
        lam.update_alias(FunctionName=name, Name=alias, FunctionVersion="1", RevisionId=got["RevisionId"])
    resp, payload = invoke(lam, f"{name}:{alias}")
    assert resp["ExecutedVersion"] == "2" and payload["value"] == "two"

    listed = {a["Name"]: a for a in lam.get_paginator("list_aliases").paginate(FunctionName=name)
              .build_full_result()["Aliases"]}
    assert listed[alias]["FunctionVersion"] == "2" and listed[alias]["AliasArn"] == created["AliasArn"]
    for version, present in (("2", True), ("1", False)):
        names = [a["Name"] for a in lam.list_aliases(FunctionName=name, FunctionVersion=version)["Aliases"]]
        assert (alias in names) == present, (version, names)

    lam.delete_alias(FunctionName=name, Name=alias)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_alias(FunctionName=name, Name=alias)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.invoke(FunctionName=f"{name}:{alias}", Payload=b"{}")


def test_weighted_alias_routing(lam: Any, two_versions: str) -> None:
    name = two_versions
    alias = unique("canary")
    routing = {"AdditionalVersionWeights": {"2": 0.3}}
    created = lam.create_alias(FunctionName=name, Name=alias, FunctionVersion="1", RoutingConfig=routing)
    assert created["RoutingConfig"] == routing, created
    assert lam.get_alias(FunctionName=name, Name=alias)["RoutingConfig"] == routing

    expected = {"1": "one", "2": "two"}
    executed: Counter[str] = Counter()
    for _ in range(300):
        resp, payload = invoke(lam, f"{name}:{alias}")
        version = resp["ExecutedVersion"]
        assert payload["value"] == expected[version], (resp, payload)
        executed[version] += 1
    # Binomial(300, 0.3): mean 90, sd 7.9; the bound is five standard deviations either side
    assert 50 <= executed["2"] <= 130, executed

    lam.update_alias(FunctionName=name, Name=alias, RoutingConfig={"AdditionalVersionWeights": {}})
    assert not lam.get_alias(FunctionName=name, Name=alias).get("RoutingConfig", {}).get(
        "AdditionalVersionWeights")
    assert {invoke(lam, f"{name}:{alias}")[0]["ExecutedVersion"] for _ in range(20)} == {"1"}


def test_deleting_versions(lam: Any) -> None:
    name = create_function(lam, python_zip(versioned_source("one")), Publish=True)
    lam.update_function_code(FunctionName=name, ZipFile=python_zip(versioned_source("two")), Publish=True)
    wait_updated(lam, name)
    for version in ("1", "2"):
        wait_version_active(lam, name, version)
    alias = unique("live")
    lam.create_alias(FunctionName=name, Name=alias, FunctionVersion="1")

    with lambda_error(lam, "ResourceConflictException", 409):
        lam.delete_function(FunctionName=name, Qualifier="1")
    assert invoke(lam, f"{name}:1")[1]["value"] == "one"

    lam.update_alias(FunctionName=name, Name=alias, FunctionVersion="2")
    lam.delete_function(FunctionName=name, Qualifier="1")
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]] == [
        "$LATEST", "2"]
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.invoke(FunctionName=f"{name}:1", Payload=b"{}")
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_function_configuration(FunctionName=name, Qualifier="1")
    with lambda_error(lam, "ResourceConflictException", 409):
        lam.delete_function(FunctionName=name, Qualifier="2")
    assert invoke(lam, f"{name}:{alias}")[1]["value"] == "two"
    assert invoke(lam, name)[1]["value"] == "two"  # $LATEST is untouched

    # deleting the function takes its versions and aliases with it
    lam.delete_function(FunctionName=name)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_alias(FunctionName=name, Name=alias)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.invoke(FunctionName=f"{name}:2", Payload=b"{}")


# --- concurrency, tags, event-invoke and URL configurations ----------------------------------


PROBE = """
import time
FRESH = True

def lambda_handler(event, context):
    global FRESH
    fresh, FRESH = FRESH, False
    time.sleep(event.get("sleep", 0))
    return {"fresh": fresh}
"""


def test_reserved_concurrency(lam: Any) -> None:
    name = create_function(lam, python_zip(PROBE))
    put = lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=1)
    assert put["ReservedConcurrentExecutions"] == 1
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 1
    assert lam.get_function(FunctionName=name)["Concurrency"] == {"ReservedConcurrentExecutions": 1}

    # the reservation is the function's concurrency limit: three overlapping calls never get a
    # second instance (each either waits for the one instance or is throttled)
    def call(_: int) -> Any:
        try:
            return invoke(lam, name, {"sleep": 1})[1]
        except lam.exceptions.TooManyRequestsException:
            return None

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(call, range(3)))
    served = [r for r in results if r is not None]
    assert served and sum(r["fresh"] for r in served) == 1, results

    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=5)
    assert lam.get_function(FunctionName=name)["Concurrency"] == {"ReservedConcurrentExecutions": 5}
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 0
    for _ in range(2):
        with lambda_error(lam, "TooManyRequestsException", 429) as info:
            lam.invoke(FunctionName=name, Payload=b"{}")
        assert info.value.response["ResponseMetadata"]["HTTPHeaders"].get("retry-after"), info.value.response

    lam.delete_function_concurrency(FunctionName=name)
    after = lam.get_function_concurrency(FunctionName=name)
    assert after.get("ReservedConcurrentExecutions") not in (0, 1, 5), after
    resp, payload = invoke(lam, name)
    assert resp["StatusCode"] == 200 and "FunctionError" not in resp and "fresh" in payload, (resp, payload)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.put_function_concurrency(FunctionName=unique("missing"), ReservedConcurrentExecutions=1)


def test_tags(lam: Any) -> None:
    name = create_function(lam, python_zip(ECHO), wait=False, Tags={"a": "1"})
    arn = function_arn(name)
    assert lam.list_tags(Resource=arn)["Tags"] == {"a": "1"}
    lam.tag_resource(Resource=arn, Tags={"b": "2", "a": "one"})
    assert lam.list_tags(Resource=arn)["Tags"] == {"a": "one", "b": "2"}
    lam.untag_resource(Resource=arn, TagKeys=["a", "not-there"])
    assert lam.list_tags(Resource=arn)["Tags"] == {"b": "2"}
    assert lam.get_function(FunctionName=name)["Tags"] == {"b": "2"}
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.list_tags(Resource=function_arn(unique("missing")))
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.tag_resource(Resource=function_arn(unique("missing")), Tags={"x": "y"})


def test_event_invoke_config(lam: Any) -> None:
    name = create_function(lam, python_zip(ECHO), wait=False)
    failure = "arn:aws:impuls:::dead-letters"
    success = "arn:aws:lambda:us-east-1:000000000000:function:impuls-done"
    put = lam.put_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=1, MaximumEventAgeInSeconds=3600,
        DestinationConfig={"OnFailure": {"Destination": failure}})
    assert put["FunctionArn"].startswith(function_arn(name)), put
    assert (put["MaximumRetryAttempts"], put["MaximumEventAgeInSeconds"]) == (1, 3600), put
    assert put["DestinationConfig"]["OnFailure"]["Destination"] == failure and put["LastModified"]
    got = lam.get_function_event_invoke_config(FunctionName=name)
    assert (got["MaximumRetryAttempts"], got["MaximumEventAgeInSeconds"]) == (1, 3600), got
    assert got["DestinationConfig"]["OnFailure"]["Destination"] == failure

    updated = lam.update_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=0, DestinationConfig={"OnSuccess": {"Destination": success}})
    assert (updated["MaximumRetryAttempts"], updated["MaximumEventAgeInSeconds"]) == (0, 3600), updated
    assert updated["DestinationConfig"]["OnSuccess"]["Destination"] == success, updated
    listed = lam.list_function_event_invoke_configs(FunctionName=name)["FunctionEventInvokeConfigs"]
    assert len(listed) == 1 and listed[0]["MaximumRetryAttempts"] == 0, listed
    assert listed[0]["MaximumEventAgeInSeconds"] == 3600

    # Put replaces the whole configuration
    lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=2)
    got = lam.get_function_event_invoke_config(FunctionName=name)
    assert got["MaximumRetryAttempts"] == 2 and got.get("MaximumEventAgeInSeconds") in (None, 21600), got
    destinations = got.get("DestinationConfig") or {}
    assert not (destinations.get("OnFailure") or {}).get("Destination"), got
    assert not (destinations.get("OnSuccess") or {}).get("Destination"), got

    lam.delete_function_event_invoke_config(FunctionName=name)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_function_event_invoke_config(FunctionName=name)
    assert lam.list_function_event_invoke_configs(FunctionName=name)["FunctionEventInvokeConfigs"] == []


def test_function_url_config(lam: Any) -> None:
    name = create_function(lam, python_zip(ECHO), wait=False)
    cors = {"AllowOrigins": ["https://example.com"], "AllowMethods": ["GET", "POST"], "MaxAge": 60,
            "AllowHeaders": ["x-custom"], "AllowCredentials": True}
    created = lam.create_function_url_config(FunctionName=name, AuthType="NONE", Cors=cors,
                                             InvokeMode="BUFFERED")
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert created["FunctionUrl"].startswith(("http://", "https://")), created
    assert created["FunctionArn"].startswith(function_arn(name)) and created["AuthType"] == "NONE"
    assert created["CreationTime"] and created.get("InvokeMode", "BUFFERED") == "BUFFERED"
    for key, value in cors.items():
        assert created["Cors"][key] == value, (key, created)

    got = lam.get_function_url_config(FunctionName=name)
    assert (got["FunctionUrl"], got["AuthType"]) == (created["FunctionUrl"], "NONE")
    assert got["CreationTime"] and got["LastModifiedTime"]
    for key, value in cors.items():
        assert got["Cors"][key] == value, (key, got)
    with lambda_error(lam, "ResourceConflictException", 409):
        lam.create_function_url_config(FunctionName=name, AuthType="NONE")

    new_cors = {"AllowOrigins": ["*"], "AllowMethods": ["GET"]}
    updated = lam.update_function_url_config(FunctionName=name, AuthType="AWS_IAM", Cors=new_cors,
                                             InvokeMode="RESPONSE_STREAM")
    assert (updated["AuthType"], updated["InvokeMode"]) == ("AWS_IAM", "RESPONSE_STREAM"), updated
    got = lam.get_function_url_config(FunctionName=name)
    assert (got["AuthType"], got["InvokeMode"], got["FunctionUrl"]) == (
        "AWS_IAM", "RESPONSE_STREAM", created["FunctionUrl"]), got
    for key, value in new_cors.items():
        assert got["Cors"][key] == value, (key, got)
    listed = lam.list_function_url_configs(FunctionName=name)["FunctionUrlConfigs"]
    assert [u["FunctionUrl"] for u in listed] == [created["FunctionUrl"]], listed
    assert listed[0]["AuthType"] == "AWS_IAM", listed

    lam.delete_function_url_config(FunctionName=name)
    with lambda_error(lam, "ResourceNotFoundException", 404):
        lam.get_function_url_config(FunctionName=name)
    assert lam.list_function_url_configs(FunctionName=name)["FunctionUrlConfigs"] == []


# --- what Impuls does not support --------------------------------------------------------------

UNSUPPORTED: list[tuple[str, str, dict[str, Any]]] = [
    ("ListLayers", "list_layers", {}),
    ("PublishLayerVersion", "publish_layer_version",
     {"LayerName": "libs", "Content": {"ZipFile": zip_bytes({"python/lib.py": "X = 1\n"})}}),
    ("AddPermission", "add_permission", {"FunctionName": "{fn}", "StatementId": "s3-invoke",
                                         "Action": "lambda:InvokeFunction", "Principal": "s3.amazonaws.com"}),
    ("RemovePermission", "remove_permission", {"FunctionName": "{fn}", "StatementId": "s3-invoke"}),
    ("GetPolicy", "get_policy", {"FunctionName": "{fn}"}),
    ("CreateEventSourceMapping", "create_event_source_mapping",
     {"FunctionName": "{fn}", "EventSourceArn": "arn:aws:sqs:us-east-1:000000000000:queue"}),
    ("ListEventSourceMappings", "list_event_source_mappings", {}),
    ("ListCodeSigningConfigs", "list_code_signing_configs", {}),
    ("PutProvisionedConcurrencyConfig", "put_provisioned_concurrency_config",
     {"FunctionName": "{fn}", "Qualifier": "$LATEST", "ProvisionedConcurrentExecutions": 1}),
    ("GetProvisionedConcurrencyConfig", "get_provisioned_concurrency_config",
     {"FunctionName": "{fn}", "Qualifier": "$LATEST"}),
]


def test_reads_of_absent_features_answer_as_for_a_function_without_them(lam: Any, echo: str) -> None:
    """The Terraform provider reads these on every refresh: they answer, they do not fail."""
    assert lam.get_function_code_signing_config(FunctionName=echo)["CodeSigningConfigArn"] == ""
    assert lam.get_runtime_management_config(FunctionName=echo)["UpdateRuntimeOn"] == "Auto"
    assert lam.get_function_recursion_config(FunctionName=echo)["RecursiveLoop"] == "Terminate"
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_code_signing_config(FunctionName="no-such-function")


@pytest.mark.parametrize(("operation", "method", "params"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_operations_say_so(lam: Any, echo: str, operation: str, method: str,
                                       params: dict[str, Any]) -> None:
    params = {k: (echo if v == "{fn}" else v) for k, v in params.items()}
    with pytest.raises(ClientError) as info:
        getattr(lam, method)(**params)
    response = info.value.response
    code, message = response["Error"]["Code"], response["Error"].get("Message", "")
    assert status_of(info.value) >= 400, response
    assert re.fullmatch(r"[A-Za-z.]+", code), f"not a Lambda error code: {response}"  # not "404" from HTML
    assert response["ResponseMetadata"]["HTTPHeaders"].get("x-amzn-errortype"), response
    assert operation in message and "support" in message.lower(), response


@pytest.fixture(autouse=True, scope="module")
def _server_survived(server: Server) -> Iterator[None]:
    """No request may have taken the server down (a traceback instead of an answer)."""
    yield
    assert server.proc is not None and server.proc.poll() is None, server.log()[-4000:]
