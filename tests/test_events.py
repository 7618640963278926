"""Asynchronous invocations (events), tested as a black box on SQLite and PostgreSQL.

``POST /api/v1/functions/{name}/invoke?async=true`` (and the Lambda API's ``Event``
invocations) answer 202 ``{"request_id"}`` once the event is durable; a queue delivers it,
retries it as Lambda does (function errors: ``maximum_retry_attempts`` more tries, after base
and 2 x base seconds; throttles: backoff without spending attempts, until the event is older
than ``maximum_event_age_seconds``), and hands its outcome to destinations (a function, with
Lambda's destination record, or Impuls' dead-letter list).  Everything is observed through
``GET /api/v1/functions/{name}/invocations/{request_id}``, the dead-letter routes, the Lambda
API and the CLI; waiting is polling with generous deadlines, never a latency bound.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.event_fixtures import (
    ACCOUNT,
    CRASH,
    DEAD_LETTERS,
    ECHO,
    EVENT_ENV,
    FAIL,
    FAIL_WHILE_ENV,
    FINAL,
    HANG,
    RETRY_BASE,
    SLEEP,
    STATES,
    THROTTLED,
    UUID_RE,
    dead_letters,
    deliveries,
    deploy,
    event_of,
    event_raw,
    events_of,
    function_arn,
    impuls_cli,
    last_result,
    letter_record,
    poll,
    put_config,
    recorder,
    send,
    send_raw,
    set_reserved,
    wait_all,
    wait_destination_records,
    wait_event,
    wait_letters,
)
from tests.helpers import Server, unique
from tests.lambda_fixtures import lambda_client, make_credentials

#: every key of Lambda's destination record for a delivered event
RECORD_KEYS = {"version", "timestamp", "requestContext", "requestPayload", "responseContext",
               "responsePayload"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, new_store: Any) -> Iterator[Server]:
    """One server per store (SQLite, PostgreSQL) for the module, with the event settings."""
    server = Server(tmp_path_factory.mktemp("events") / "data", env={**new_store(), **EVENT_ENV}).start()
    yield server
    server.stop()


def check_record(record: Any, request_id: str, function: str, condition: str, count: int,
                 payload: Any) -> dict[str, Any]:
    """``record`` is Lambda's destination record of event ``request_id`` of ``function``."""
    assert isinstance(record, dict), record
    assert record["version"] == "1.0", record
    stamp = record["timestamp"]
    assert isinstance(stamp, str) and datetime.fromisoformat(stamp.replace("Z", "+00:00")), record
    ctx = record["requestContext"]
    assert set(ctx) == {"requestId", "functionArn", "condition", "approximateInvokeCount"}, record
    assert ctx["requestId"] == request_id, record
    arn = rf"arn:aws:lambda:[a-z0-9-]+:{ACCOUNT}:function:{re.escape(function)}(:\$LATEST)?"
    assert re.fullmatch(arn, ctx["functionArn"]), record
    assert ctx["condition"] == condition, record
    assert ctx["approximateInvokeCount"] == count, record
    assert record["requestPayload"] == payload, record
    return record


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one ending as another starts: not overlapping)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


# --- accepting ---------------------------------------------------------------------------------


def test_accepted_event_is_visible_at_once_and_delivered(srv: Server) -> None:
    name = deploy(srv, ECHO)
    r = send_raw(srv, name, {"hello": "world"})
    assert r.status_code == 202, r.text
    rid = r.json()["request_id"]
    assert UUID_RE.fullmatch(rid), rid
    first = event_of(srv, name, rid)  # committed before the 202: readable at once
    assert first["request_id"] == rid and first["state"] in STATES
    assert first["attempts"] in (0, 1) and first["duplicates"] == 0

    ev = wait_event(srv, name, rid)
    assert ev["state"] == "succeeded", ev
    assert ev["attempts"] == 1 and ev["duplicates"] == 0, ev
    [run] = deliveries(ev)
    assert run["outcome"] == "success" and run["error_type"] is None, ev
    assert last_result(ev) == {"event": {"hello": "world"}, "request_id": rid, "version": "$LATEST"}

    empty = send(srv, name)  # an empty body is the event {}
    assert empty != rid
    ev = wait_event(srv, name, empty)
    assert ev["state"] == "succeeded" and last_result(ev)["event"] == {}, ev


def test_unknown_events_are_404(srv: Server) -> None:
    name = deploy(srv, ECHO)
    other = deploy(srv, ECHO)
    rid = send(srv, name, {})
    assert event_raw(srv, other, rid).status_code == 404  # an event belongs to its function
    assert event_raw(srv, name, "00000000-0000-4000-8000-000000000000").status_code == 404
    assert event_raw(srv, unique("nope"), rid).status_code == 404
    assert wait_event(srv, name, rid)["state"] == "succeeded"


def test_rejections_are_decided_before_the_202(srv: Server) -> None:
    r = send_raw(srv, unique("nope"), {"a": 1})
    assert r.status_code == 404 and r.json()["error"] is True, r.text

    name = deploy(srv, "import json\ndef handler(e, c):\n    return len(json.dumps(e))\n")
    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"status": "inactive"})
    assert r.status_code == 200, r.text
    r = send_raw(srv, name, {"a": 1})
    assert r.status_code == 403 and r.json()["error"] is True, r.text
    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"status": "active"})
    assert r.status_code == 200, r.text

    r = send_raw(srv, name, {"x": "a" * (1024 * 1024)})  # over 1 MB: refused at once
    assert r.status_code == 413 and r.json()["error"] is True, r.text
    assert events_of(srv, name) == []  # nothing was queued by any refusal

    big = {"x": "a" * (900 * 1024)}  # under 1 MB, however a megabyte is counted
    rid = send(srv, name, big)
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "succeeded" and last_result(ev) == len(json.dumps(big)), ev


# --- retries -----------------------------------------------------------------------------------


def _attempt_times(ev: dict[str, Any], request_id: str) -> list[float]:
    """The times FAIL raised at, from the error of each delivery (which names the request id)."""
    times = []
    for run in deliveries(ev):
        assert f"rid={request_id}" in run["error"], ev  # the same aws_request_id on every try
        times.append(float(re.search(r"t=([0-9.]+)", run["error"]).group(1)))  # type: ignore[union-attr]
    return times


def test_function_error_is_retried_twice_after_base_and_twice_base(srv: Server) -> None:
    name = deploy(srv, FAIL)
    rid = send(srv, name, {"n": 1})
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "failed", ev
    assert ev["attempts"] == 3 and ev["duplicates"] == 0, ev  # 1 + the default 2 retries
    runs = deliveries(ev)
    assert [h["outcome"] for h in runs] == ["error"] * 3, ev
    assert all(h["error_type"] == "ValueError" and "boom" in h["error"] for h in runs), ev
    t1, t2, t3 = _attempt_times(ev, rid)
    slack = 0.05  # clock reading; a lower bound only: retries may come later, never sooner
    assert t2 - t1 >= RETRY_BASE - slack, (t1, t2)
    assert t3 - t2 >= 2 * RETRY_BASE - slack, (t2, t3)


def test_retries_follow_the_event_config(srv: Server) -> None:
    name = deploy(srv, FAIL)
    put_config(srv, name, maximum_retry_attempts=0)
    rid = send(srv, name, {})
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "failed" and ev["attempts"] == 1 and len(deliveries(ev)) == 1, ev

    put_config(srv, name, maximum_retry_attempts=1)
    rid = send(srv, name, {})
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "failed" and ev["attempts"] == 2 and len(deliveries(ev)) == 2, ev
    assert len(set(_attempt_times(ev, rid))) == 2


def test_timeouts_and_crashes_are_function_errors(srv: Server) -> None:
    hang = deploy(srv, HANG, timeout_sec=1)
    crash = deploy(srv, CRASH)
    for name in (hang, crash):
        put_config(srv, name, maximum_retry_attempts=1)
    rids = {hang: send(srv, hang, {}), crash: send(srv, crash, {})}
    for name, outcome, error_type in ((hang, "timeout", "Sandbox.Timeout"),
                                      (crash, "crash", "Runtime.ExitError")):
        ev = wait_event(srv, name, rids[name])
        assert ev["state"] == "failed" and ev["attempts"] == 2, ev
        runs = deliveries(ev)
        assert [h["outcome"] for h in runs] == [outcome, outcome], ev
        assert all(h["error_type"] == error_type for h in runs), ev


def test_event_config_of_a_version_applies_to_its_events(srv: Server) -> None:
    name = deploy(srv, FAIL)
    r = srv.request("POST", f"/api/v1/functions/{name}/versions")
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    put_config(srv, name, qualifier=version, maximum_retry_attempts=0)
    put_config(srv, name, maximum_retry_attempts=1)
    pinned = send(srv, name, {}, qualifier=version)
    latest = send(srv, name, {})
    ev = wait_event(srv, name, pinned)
    assert ev["state"] == "failed" and ev["attempts"] == 1, ev
    assert f"version={version} " in deliveries(ev)[0]["error"], ev
    ev = wait_event(srv, name, latest)
    assert ev["state"] == "failed" and ev["attempts"] == 2, ev
    assert "version=$LATEST " in deliveries(ev)[0]["error"], ev


# --- the event-invoke configuration ------------------------------------------------------------


def test_event_config_routes(srv: Server) -> None:
    name = deploy(srv, ECHO)
    dest = deploy(srv, ECHO, prefix="dest")
    path = f"/api/v1/functions/{name}/event-config"
    assert srv.request("GET", path).status_code == 404  # none yet

    doc = put_config(srv, name)
    assert doc["maximum_retry_attempts"] == 2 and doc["maximum_event_age_seconds"] == 21600, doc
    assert doc["on_success"] is None and doc["on_failure"] is None, doc

    wanted = {"maximum_retry_attempts": 1, "maximum_event_age_seconds": 2,  # IMPULS_EVENT_MIN_AGE_SECONDS
              "on_success": function_arn(dest), "on_failure": DEAD_LETTERS}
    doc = put_config(srv, name, **wanted)
    assert {k: doc[k] for k in wanted} == wanted, doc
    got = srv.request("GET", path)
    assert got.status_code == 200 and {k: got.json()[k] for k in wanted} == wanted, got.text

    for field, bad in (("maximum_retry_attempts", 3), ("maximum_retry_attempts", -1),
                       ("maximum_retry_attempts", "1"), ("maximum_event_age_seconds", 1),
                       ("maximum_event_age_seconds", 21601), ("on_success", "not-an-arn"),
                       ("on_failure", 7), ("bogus", 1)):
        r = srv.request("PUT", path, json={field: bad})
        assert r.status_code == 400, (field, bad, r.text)
        assert r.json()["error"] is True and field in r.json()["message"], r.text
    assert {k: srv.request("GET", path).json()[k] for k in wanted} == wanted  # untouched

    doc = put_config(srv, name, maximum_retry_attempts=0)  # a PUT replaces: the rest are defaults
    assert doc["maximum_retry_attempts"] == 0 and doc["maximum_event_age_seconds"] == 21600, doc
    assert doc["on_success"] is None and doc["on_failure"] is None, doc

    r = srv.request("POST", f"/api/v1/functions/{name}/versions")
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    put_config(srv, name, qualifier=version, maximum_retry_attempts=1, on_failure=DEAD_LETTERS)
    got = srv.request("GET", path, params={"qualifier": version}).json()
    assert got["maximum_retry_attempts"] == 1 and got["on_failure"] == DEAD_LETTERS, got
    assert srv.request("GET", path).json()["maximum_retry_attempts"] == 0  # $LATEST's is its own
    assert srv.request("PUT", path, json={}, params={"qualifier": "99"}).status_code == 404
    r = srv.request("POST", f"/api/v1/functions/{name}/aliases", json={"name": "live",
                                                                       "function_version": version})
    assert r.status_code == 201, r.text
    put_config(srv, name, qualifier="live", maximum_event_age_seconds=600)
    got = srv.request("GET", path, params={"qualifier": "live"}).json()
    assert got["maximum_event_age_seconds"] == 600 and got["maximum_retry_attempts"] == 2, got
    assert srv.request("GET", path, params={"qualifier": version}).json()["maximum_retry_attempts"] == 1

    assert srv.request("DELETE", path, params={"qualifier": version}).status_code in (200, 204)
    assert srv.request("GET", path, params={"qualifier": version}).status_code == 404
    assert srv.request("GET", path).status_code == 200
    assert srv.request("DELETE", path).status_code in (200, 204)
    assert srv.request("GET", path).status_code == 404
    assert srv.request("DELETE", path).status_code == 404
    missing = f"/api/v1/functions/{unique('nope')}/event-config"
    assert srv.request("PUT", missing, json={}).status_code == 404
    assert srv.request("GET", missing).status_code == 404


# --- throttles and event age --------------------------------------------------------------------


def test_throttled_event_spends_no_attempt_and_runs_once_the_throttle_is_lifted(srv: Server) -> None:
    name = deploy(srv, ECHO)
    put_config(srv, name, maximum_retry_attempts=0)  # a throttle must not spend even one
    set_reserved(srv, name, 0)
    rid = send(srv, name, {"patient": True})

    # While throttled: not delivered, no attempt spent; the history shows "throttled" entries
    # or nothing.  Watch for a while (until a throttled entry shows up, at most a few seconds).
    watch_until = time.monotonic() + 4
    while True:
        ev = event_of(srv, name, rid)
        assert ev["state"] in ("queued", "retrying", "running"), ev
        assert ev["attempts"] == 0 and deliveries(ev) == [], ev
        if time.monotonic() > watch_until or any(h["outcome"] == THROTTLED for h in ev["history"]):
            break
        time.sleep(0.2)

    set_reserved(srv, name, None)
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "succeeded", ev
    assert ev["attempts"] == 1, ev
    [run] = deliveries(ev)
    assert run["outcome"] == "success", ev
    assert last_result(ev) == {"event": {"patient": True}, "request_id": rid, "version": "$LATEST"}


def test_event_older_than_its_maximum_age_expires(srv: Server) -> None:
    name = deploy(srv, ECHO)
    put_config(srv, name, maximum_event_age_seconds=2, on_failure=DEAD_LETTERS)
    set_reserved(srv, name, 0)
    rid = send(srv, name, {"old": True})
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "expired", ev
    assert ev["attempts"] == 0 and deliveries(ev) == [], ev

    [letter] = wait_letters(srv, name, 1)
    assert letter["request_id"] == rid and letter["condition"] == "EventAgeExceeded", letter
    record = letter_record(letter)
    assert record["version"] == "1.0", record
    ctx = record["requestContext"]
    assert ctx["requestId"] == rid and ctx["condition"] == "EventAgeExceeded", record
    assert ctx["approximateInvokeCount"] == 0, record
    assert record["requestPayload"] == {"old": True}, record

    set_reserved(srv, name, None)  # an expired event stays expired: it is never delivered
    fresh = send(srv, name, {"new": True})
    assert wait_event(srv, name, fresh)["state"] == "succeeded"
    ev = event_of(srv, name, rid)
    assert ev["state"] == "expired" and ev["attempts"] == 0 and deliveries(ev) == [], ev


# --- destinations ------------------------------------------------------------------------------


def test_success_destination_function_receives_lambdas_record(srv: Server) -> None:
    dest = recorder(srv)
    name = deploy(srv, "def handler(e, c):\n    return {'answer': 42, 'got': e}\n")
    put_config(srv, name, on_success=function_arn(dest), on_failure=DEAD_LETTERS)
    rid = send(srv, name, {"k": "v"})
    assert wait_event(srv, name, rid)["state"] == "succeeded"

    [record] = wait_destination_records(srv, dest, 1)
    check_record(record, rid, name, "Success", 1, {"k": "v"})
    assert set(record) == RECORD_KEYS, record
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}, record
    assert record["responsePayload"] == {"answer": 42, "got": {"k": "v"}}, record
    assert dead_letters(srv, name) == []  # the failure destination is not used on success


def test_failure_destination_function_receives_lambdas_record(srv: Server) -> None:
    dest = recorder(srv)
    name = deploy(srv, FAIL)
    put_config(srv, name, maximum_retry_attempts=1, on_failure=function_arn(dest))
    rid = send(srv, name, {"will": "fail"})
    assert wait_event(srv, name, rid)["state"] == "failed"

    [record] = wait_destination_records(srv, dest, 1)
    check_record(record, rid, name, "RetriesExhausted", 2, {"will": "fail"})
    assert set(record) == RECORD_KEYS, record
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST",
                                         "functionError": "Unhandled"}, record
    error = record["responsePayload"]
    assert error["errorType"] == "ValueError", record
    assert "boom" in error["errorMessage"] and f"rid={rid}" in error["errorMessage"], record


def test_dead_letters_list_delete_and_redrive(srv: Server) -> None:
    name = deploy(srv, FAIL_WHILE_ENV, environment={"FAIL": "1"})
    put_config(srv, name, maximum_retry_attempts=0, on_failure=DEAD_LETTERS)
    rids = [send(srv, name, {"n": i}) for i in range(3)]
    for rid, ev in wait_all(srv, name, rids).items():
        assert ev["state"] == "failed" and ev["attempts"] == 1, (rid, ev)

    letters = wait_letters(srv, name, 3)
    assert len(letters) == 3, letters
    by_rid = {letter["request_id"]: letter for letter in letters}
    assert set(by_rid) == set(rids), letters
    assert len({letter["id"] for letter in letters}) == 3, letters
    for i, rid in enumerate(rids):
        letter = by_rid[rid]
        assert letter["condition"] == "RetriesExhausted", letter
        record = letter_record(letter)
        check_record(record, rid, name, "RetriesExhausted", 1, {"n": i})
        assert record["responseContext"]["functionError"] == "Unhandled", record
        assert record["responsePayload"]["errorType"] == "ValueError", record

    base = f"/api/v1/functions/{name}/dead-letters"
    gone = by_rid[rids[0]]["id"]
    assert srv.request("DELETE", f"{base}/{gone}").status_code in (200, 204)
    assert gone not in {letter["id"] for letter in dead_letters(srv, name)}
    assert srv.request("DELETE", f"{base}/{gone}").status_code == 404
    assert srv.request("POST", f"{base}/{gone}/redrive").status_code == 404

    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"environment": {"FAIL": "0"}})
    assert r.status_code == 200, r.text
    again = by_rid[rids[1]]["id"]
    r = srv.request("POST", f"{base}/{again}/redrive")
    assert r.status_code in (200, 201, 202), r.text
    new = r.json()["request_id"]
    assert new not in rids
    left = dead_letters(srv, name)
    assert [letter["request_id"] for letter in left] == [rids[2]], left
    ev = wait_event(srv, name, new)
    assert ev["state"] == "succeeded", ev
    assert last_result(ev) == {"event": {"n": 1}, "request_id": new}, ev
    assert event_of(srv, name, rids[1])["state"] == "failed"  # the original keeps its story


# --- concurrency ---------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_delivery_respects_reserved_concurrency_and_sync_calls_still_run(srv: Server) -> None:
    name = deploy(srv, SLEEP, timeout_sec=120)
    set_reserved(srv, name, 2)
    # 20 x 1.5 s on 2 instances: a backlog longer than a synchronous call may wait in the
    # queue (IMPULS_QUEUE_TIMEOUT, 10 s): a call starved by the deliveries would get 429
    rids = [send(srv, name, {"sleep": 1.5, "i": i}) for i in range(20)]
    poll(lambda: [event_of(srv, name, rid)["state"] for rid in rids],
         lambda states: any(s in ("running", "succeeded") for s in states), what="a delivery started")

    r = srv.invoke(name, {"sleep": 0, "sync": True})
    assert r.status_code == 200, r.text
    sync = r.json()
    assert sync["status_code"] == 200, sync

    done = wait_all(srv, name, rids, timeout=400)
    results = [last_result(ev) for ev in done.values()]
    assert all(ev["state"] == "succeeded" for ev in done.values()), done
    assert all(res["request_id"] == rid for rid, res in zip(done, results, strict=True))
    intervals = [(res["start"], res["end"]) for res in results]
    peak = max_overlap([*intervals, (sync["body"]["start"], sync["body"]["end"])])
    assert peak <= 2, f"{peak} calls ran at once with reserved concurrency 2"
    # the synchronous call was served while events were still waiting, not after all of them
    assert sync["body"]["start"] < max(start for start, _ in intervals)


# --- the Lambda API ------------------------------------------------------------------------------


def test_lambda_api_event_invocations_and_event_invoke_config(srv: Server) -> None:
    creds = make_credentials(srv, "deploy")
    lam = lambda_client(srv.url, creds.access_key_id, creds.secret_access_key)
    name = deploy(srv, ECHO)
    resp = lam.invoke(FunctionName=name, InvocationType="Event", Payload=json.dumps({"via": "lambda"}))
    assert resp["StatusCode"] == 202, resp
    rid = resp["ResponseMetadata"]["RequestId"]
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "succeeded", ev
    assert last_result(ev) == {"event": {"via": "lambda"}, "request_id": rid, "version": "$LATEST"}

    with pytest.raises(ClientError) as err:
        lam.invoke(FunctionName=unique("nope"), InvocationType="Event", Payload=b"{}")
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(ClientError) as err:
        lam.invoke(FunctionName=name, InvocationType="Event",
                   Payload=json.dumps({"x": "a" * (1024 * 1024)}))
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert err.value.response["Error"]["Code"] == "RequestTooLargeException"

    failing = deploy(srv, FAIL)
    lam.put_function_event_invoke_config(FunctionName=failing, MaximumRetryAttempts=0,
                                         MaximumEventAgeInSeconds=3600,
                                         DestinationConfig={"OnFailure": {"Destination": DEAD_LETTERS}})
    native = srv.request("GET", f"/api/v1/functions/{failing}/event-config").json()
    assert native["maximum_retry_attempts"] == 0 and native["maximum_event_age_seconds"] == 3600, native
    assert native["on_failure"] == DEAD_LETTERS and native["on_success"] is None, native
    resp = lam.invoke(FunctionName=failing, InvocationType="Event", Payload=b'{"lambda": 1}')
    assert resp["StatusCode"] == 202, resp
    rid = resp["ResponseMetadata"]["RequestId"]
    ev = wait_event(srv, failing, rid)
    assert ev["state"] == "failed" and ev["attempts"] == 1, ev
    [letter] = wait_letters(srv, failing, 1)
    assert letter["request_id"] == rid, letter


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_invoke_async_and_events(srv: Server) -> None:
    name = deploy(srv, ECHO)
    out = impuls_cli(srv, "invoke", name, "--async", "--data", '{"from": "cli"}')
    assert out.returncode == 0, out.stderr
    ids = set(UUID_RE.findall(out.stdout))
    assert len(ids) == 1, out.stdout
    [rid] = ids
    ev = wait_event(srv, name, rid)
    assert ev["state"] == "succeeded", ev
    assert last_result(ev) == {"event": {"from": "cli"}, "request_id": rid, "version": "$LATEST"}

    other = send(srv, name, {"from": "api"})
    wait_event(srv, name, other)
    out = impuls_cli(srv, "events", name)
    assert out.returncode == 0, out.stderr
    assert rid in out.stdout and other in out.stdout, out.stdout

    out = impuls_cli(srv, "invoke", unique("nope"), "--async", "--data", "{}")
    assert out.returncode != 0 and "404" in out.stderr, (out.stdout, out.stderr)


def test_cli_dead_letters_list_and_redrive(srv: Server) -> None:
    name = deploy(srv, FAIL_WHILE_ENV, environment={"FAIL": "1"})
    put_config(srv, name, maximum_retry_attempts=0, on_failure=DEAD_LETTERS)
    rids = [send(srv, name, {"n": i}) for i in range(3)]
    wait_all(srv, name, rids)
    letters = wait_letters(srv, name, 3)
    out = impuls_cli(srv, "dead-letters", name)
    assert out.returncode == 0, out.stderr
    assert all(letter["id"] in out.stdout for letter in letters), out.stdout

    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"environment": {"FAIL": "0"}})
    assert r.status_code == 200, r.text

    def succeeded() -> list[dict[str, Any]]:
        return [ev for ev in events_of(srv, name) if ev["state"] == "succeeded"]

    first = letters[0]
    out = impuls_cli(srv, "dead-letters", name, "--redrive", first["id"])
    assert out.returncode == 0, out.stderr
    assert {letter["id"] for letter in dead_letters(srv, name)} == {letter["id"] for letter in letters[1:]}
    [redriven] = poll(succeeded, lambda evs: len(evs) >= 1, what="the redriven event succeeded")
    assert last_result(redriven)["event"] == letter_record(first)["requestPayload"], redriven

    out = impuls_cli(srv, "dead-letters", name, "--all")
    assert out.returncode == 0, out.stderr
    assert dead_letters(srv, name) == []
    evs = poll(succeeded, lambda evs: len(evs) >= 3, what="every redriven event succeeded")
    assert sorted(last_result(ev)["event"]["n"] for ev in evs) == [0, 1, 2], evs
    assert all(event_of(srv, name, rid)["state"] == "failed" for rid in rids)
    assert all(ev["state"] in FINAL for ev in events_of(srv, name))
