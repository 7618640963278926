"""Helpers shared by the asynchronous-event acceptance tests (``test_events*.py``).

Events are tested as a black box, through ``/api/v1``, the Lambda API and the CLI only:
``POST /api/v1/functions/{name}/invoke?async=true`` answers 202 ``{"request_id"}`` once the
event is durable, and ``GET /api/v1/functions/{name}/invocations/{request_id}`` shows its
``state``, ``attempts``, ``duplicates`` and ``history``.  Waiting is always polling with a
generous deadline: nothing here asserts how fast anything happens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import httpx

from tests.helpers import Server, unique

ACCOUNT = "000000000000"
REGION = "us-east-1"
#: Impuls' own destination: the function's dead-letter list
DEAD_LETTERS = "arn:aws:impuls:::dead-letters"
#: the retry delays are base x 1 and base x 2 (Lambda: 1 and 2 minutes)
RETRY_BASE = 0.5
#: what every events test server runs with: short retry delays, event ages down to 2 s and a
#: throttle/system-error backoff capped at 2 s (so a lifted throttle is noticed soon)
EVENT_ENV = {
    "IMPULS_EVENT_RETRY_BASE_SECONDS": str(RETRY_BASE),
    "IMPULS_EVENT_MIN_AGE_SECONDS": "2",
    "IMPULS_EVENT_BACKOFF_MAX_SECONDS": "2",
}
STATES = {"queued", "running", "retrying", "succeeded", "failed", "expired"}
FINAL = frozenset({"succeeded", "failed", "expired"})
#: a history entry of a throttled delivery (when the implementation records them at all)
THROTTLED = "throttled"
#: generous deadlines: a slow CI host must never fail these tests
DEADLINE = 120.0
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

T = TypeVar("T")

# --- functions (Python; handler "handler.handler") -------------------------------------------

HANDLER = "handler.handler"

#: returns what it got and the request id it saw
ECHO = """
def handler(event, context):
    return {"event": event, "request_id": context.aws_request_id,
            "version": context.function_version}
"""

#: raises on every call; the message carries the request id, the version and the time
FAIL = """
import time
def handler(event, context):
    raise ValueError(f"boom rid={context.aws_request_id} version={context.function_version} "
                     f"t={time.time():.6f}")
"""

#: fails while its environment says FAIL=1, else echoes
FAIL_WHILE_ENV = """
import os
def handler(event, context):
    if os.environ.get("FAIL") == "1":
        raise ValueError("failing on purpose")
    return {"event": event, "request_id": context.aws_request_id}
"""

#: sleeps ``event["sleep"]`` seconds and reports when it ran (wall clock, host and sandbox alike)
SLEEP = """
import time
def handler(event, context):
    start = time.time()
    time.sleep(event.get("sleep", 0))
    return {"start": start, "end": time.time(), "request_id": context.aws_request_id,
            "sync": bool(event.get("sync"))}
"""

#: the runtime process exits in the middle of the call
CRASH = """
import os
def handler(event, context):
    print("exiting", flush=True)
    os._exit(3)
"""

#: runs longer than its timeout (deploy with timeout_sec=1)
HANG = """
import time
def handler(event, context):
    time.sleep(30)
    return "never"
"""


def function_arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


def deploy(server: Server, code: str, prefix: str = "ev", **over: Any) -> str:
    """A new Python function (unique name); its name."""
    fn = server.deploy(name=unique(prefix), runtime="python3.11", handler=HANDLER, code=code, **over)
    return str(fn["name"])


# --- sending and reading events --------------------------------------------------------------


def send_raw(server: Server, name: str, event: Any = None, client: httpx.Client | None = None,
             **params: Any) -> httpx.Response:
    """``POST /api/v1/functions/{name}/invoke?async=true`` (more query parameters in ``params``);
    ``client``: another client of the server (see :func:`new_client`)."""
    body = b"" if event is None else json.dumps(event).encode()
    return (client or server.client).post(f"/api/v1/functions/{name}/invoke", content=body,
                                          params={"async": "true", **params},
                                          headers={"Content-Type": "application/json"})


def new_client(server: Server) -> httpx.Client:
    """Another client of ``server`` (its admin key), e.g. one per thread of a burst."""
    return httpx.Client(base_url=server.url, timeout=120, headers=dict(server.client.headers))


def send(server: Server, name: str, event: Any = None, **params: Any) -> str:
    """An asynchronous invoke that must be accepted; its request id."""
    r = send_raw(server, name, event, **params)
    assert r.status_code == 202, f"async invoke of {name}: {r.status_code} {r.text}"
    doc = r.json()
    assert isinstance(doc, dict) and isinstance(doc.get("request_id"), str) and doc["request_id"], doc
    return str(doc["request_id"])


def event_raw(server: Server, name: str, request_id: str) -> httpx.Response:
    return server.request("GET", f"/api/v1/functions/{name}/invocations/{request_id}")


def event_of(server: Server, name: str, request_id: str) -> dict[str, Any]:
    """The event's record; fails the test unless it exists."""
    r = event_raw(server, name, request_id)
    assert r.status_code == 200, f"event {request_id} of {name}: {r.status_code} {r.text}"
    doc = r.json()
    assert doc["state"] in STATES, doc
    return dict(doc)


def poll(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = DEADLINE,
         interval: float = 0.2, what: str = "condition") -> T:
    """Call ``probe`` until ``done(result)``; a generous deadline, never a speed assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s; last: {value!r}")
        time.sleep(interval)


def wait_event(server: Server, name: str, request_id: str, states: Iterable[str] = FINAL,
               timeout: float = DEADLINE) -> dict[str, Any]:
    """Poll the event until its state is one of ``states`` (default: any final state)."""
    wanted = set(states)
    return poll(lambda: event_of(server, name, request_id), lambda e: e["state"] in wanted, timeout,
                what=f"event {request_id} of {name} in {sorted(wanted)}")


def wait_all(server: Server, name: str, request_ids: Iterable[str], states: Iterable[str] = FINAL,
             timeout: float = DEADLINE) -> dict[str, dict[str, Any]]:
    """Poll every event until each is in one of ``states``; {request_id: record}."""
    wanted = set(states)
    pending = list(request_ids)
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while pending:
        still = []
        for rid in pending:
            doc = event_of(server, name, rid)
            if doc["state"] in wanted:
                done[rid] = doc
            else:
                still.append(rid)
        pending = still
        if pending and time.monotonic() > deadline:
            sample = {rid: event_of(server, name, rid)["state"] for rid in pending[:10]}
            raise AssertionError(f"{len(pending)} events of {name} not in {sorted(wanted)} within "
                                 f"{timeout:.0f}s; for example {sample}")
        if pending:
            time.sleep(0.25)
    return done


def as_json(value: Any) -> Any:
    """A result as a JSON value (a result stored as JSON text is parsed)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def deliveries(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The history entries of deliveries that reached the function (throttles left out)."""
    return [h for h in event["history"] if h["outcome"] != THROTTLED]


def last_result(event: dict[str, Any]) -> Any:
    """The result of the event's last delivery."""
    runs = deliveries(event)
    assert runs, f"no delivery in {event!r}"
    return as_json(runs[-1]["result"])


# --- configuration ---------------------------------------------------------------------------


def put_config(server: Server, name: str, qualifier: str | None = None, **fields: Any) -> dict[str, Any]:
    """``PUT /api/v1/functions/{name}/event-config``; must succeed."""
    params = {"qualifier": qualifier} if qualifier else {}
    r = server.request("PUT", f"/api/v1/functions/{name}/event-config", json=fields, params=params)
    assert r.status_code in (200, 201), f"event-config of {name}: {r.status_code} {r.text}"
    return dict(r.json())


def set_reserved(server: Server, name: str, n: int | None) -> None:
    """Reserved concurrency ``n``; None removes it."""
    path = f"/api/v1/functions/{name}/concurrency"
    if n is None:
        r = server.request("DELETE", path)
    else:
        r = server.request("PUT", path, json={"reserved_concurrency": n})
    assert r.status_code == 200, r.text


# --- dead letters ----------------------------------------------------------------------------


def dead_letters(server: Server, name: str) -> list[dict[str, Any]]:
    """``GET /api/v1/functions/{name}/dead-letters``: the list of letters (a bare list, or the
    one list in the object answered, e.g. ``{"dead_letters": [...]}``)."""
    r = server.request("GET", f"/api/v1/functions/{name}/dead-letters")
    assert r.status_code == 200, f"dead letters of {name}: {r.status_code} {r.text}"
    doc = r.json()
    if isinstance(doc, list):
        return doc
    assert isinstance(doc, dict), doc
    if isinstance(doc.get("dead_letters"), list):
        return list(doc["dead_letters"])
    lists = [v for v in doc.values() if isinstance(v, list)]
    assert len(lists) == 1, f"cannot tell the list of dead letters in {doc!r}"
    return list(lists[0])


def wait_letters(server: Server, name: str, count: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
    return poll(lambda: dead_letters(server, name), lambda ls: len(ls) >= count, timeout,
                what=f"{count} dead letters of {name}")


# --- events of a function whose request ids the test does not know (destinations) -------------


def impuls_cli(server: Server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI against ``server`` with its admin key; a wide terminal so ids are never cut."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")}
    env.update({"IMPULS_API_KEY": server.admin_key, "COLUMNS": "400", "NO_COLOR": "1"})
    return subprocess.run([sys.executable, "-m", "impuls", "--url", server.url, *args],
                          capture_output=True, text=True, timeout=timeout, check=False, env=env)


def events_of(server: Server, name: str) -> list[dict[str, Any]]:
    """Every event of function ``name`` that can be found: the request ids ``impuls events
    NAME`` prints and those of the function's invocation records, each looked up with
    ``GET .../invocations/{request_id}`` (only answers that are events are kept)."""
    ids: list[str] = []
    out = impuls_cli(server, "events", name)
    if out.returncode == 0:
        ids += UUID_RE.findall(out.stdout)
    r = server.request("GET", f"/api/v1/functions/{name}/invocations", params={"limit": 1000})
    if r.status_code == 200:
        ids += [str(rec["request_id"]) for rec in r.json().get("invocations", [])]
    found = []
    for rid in dict.fromkeys(ids):
        got = event_raw(server, name, rid)
        if got.status_code == 200 and isinstance(got.json(), dict) and "state" in got.json():
            found.append(dict(got.json()))
    return found


def recorder(server: Server) -> str:
    """A destination function that keeps what it receives where the test can read it: it
    fails on every event (no retries) into its own dead-letter list, so each letter's
    ``record.requestPayload`` is an event it received."""
    name = deploy(server, "def handler(event, context):\n    raise RuntimeError('recorded')\n",
                  prefix="dest")
    put_config(server, name, maximum_retry_attempts=0, on_failure=DEAD_LETTERS)
    return name


def letter_record(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead letter's destination record (an object, or JSON text of one)."""
    record = as_json(letter["record"])
    assert isinstance(record, dict), letter
    return record


def wait_destination_records(server: Server, name: str, count: int = 1,
                             timeout: float = DEADLINE) -> list[dict[str, Any]]:
    """The events a :func:`recorder` function ``name`` received, once there are ``count``."""
    letters = wait_letters(server, name, count, timeout)
    return [letter_record(letter)["requestPayload"] for letter in letters]
