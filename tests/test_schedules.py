"""Schedules through a real server: events fired on a timetable, EventBridge's shape, time zones,
and no slot fired twice across a SIGKILL and a restart (the timetable logic itself, daylight-saving
days and catch-up with an injected clock, is in tests/unit/test_schedules.py)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from tests.helpers import Server, unique

RETURN_EVENT = "def handler(event, context):\n    return event\n"


def _deploy(server: Server) -> str:
    return str(server.deploy(name=unique("sched"), runtime="python3.11", handler="handler.handler",
                             code=RETURN_EVENT)["name"])


def _fired(server: Server, name: str) -> list[dict[str, Any]]:
    """The events the function's schedules fired, each with the result (its own event)."""
    doc = server.request("GET", f"/api/v1/functions/{name}/events", params={"limit": 1000}).json()
    out = []
    for e in doc["events"]:
        if e["source"] == "schedule":
            path = f"/api/v1/functions/{name}/invocations/{e['request_id']}"
            out.append(server.request("GET", path).json())
    return out


def _wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_a_rate_schedule_fires_eventbridge_events_and_never_a_slot_twice(
        make_server: Callable[..., Server]) -> None:
    server = make_server()
    name = _deploy(server)
    r = server.request("POST", f"/api/v1/functions/{name}/schedules",
                       json={"name": "tick", "expression": "rate(1 second)"})
    assert r.status_code == 201, r.text
    assert r.json()["next_slot"] and r.json()["enabled"] is True

    def succeeded(count: int) -> Callable[[], bool]:
        return lambda: sum(e["state"] == "succeeded" for e in _fired(server, name)) >= count

    _wait_for(succeeded(3))
    first = _fired(server, name)
    event = next(e["result"] for e in first if e["state"] == "succeeded")
    assert event["version"] == "0" and event["detail-type"] == "Scheduled Event"
    assert event["source"] == "aws.events" and event["detail"] == {} and event["account"] == "000000000000"
    assert event["resources"] and event["time"].endswith("Z")
    server.kill()  # SIGKILL: whatever was in flight is not finished
    again = make_server(data_dir=server.data_dir, env={"IMPULS_ADMIN_KEY": server.admin_key})
    before = len(_fired(again, name))
    _wait_for(lambda: sum(e["state"] == "succeeded" for e in _fired(again, name)) >= before + 3)
    slots = [e["result"]["time"] for e in _fired(again, name) if e["state"] == "succeeded"]
    assert len(slots) == len(set(slots)), f"a slot fired twice: {sorted(slots)}"
    times = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")) for t in slots)
    assert all((b - a).total_seconds() >= 1 for a, b in itertools.pairwise(times))


def test_a_cron_schedule_in_a_time_zone_with_its_own_payload(make_server: Callable[..., Server]) -> None:
    server = make_server()
    name = _deploy(server)
    body = {"name": "noon", "expression": "cron(0 12 * * ? *)", "timezone": "Europe/Berlin",
            "payload": {"job": "report"}}
    r = server.request("POST", f"/api/v1/functions/{name}/schedules", json=body)
    assert r.status_code == 201, r.text
    slot = datetime.fromisoformat(r.json()["next_slot"].replace("Z", "+00:00"))
    assert slot.minute == 0 and slot.hour in (10, 11)  # 12:00 in Berlin is 10:00 or 11:00 UTC
    listed = server.request("GET", f"/api/v1/functions/{name}/schedules").json()
    assert [s["name"] for s in listed["schedules"]] == ["noon"]
    bad = server.request("POST", f"/api/v1/functions/{name}/schedules",
                         json={"name": "bad", "expression": "cron(0 25 * * ? *)"})
    assert bad.status_code == 400 and "expression" in bad.json()["message"]
    assert server.request("POST", f"/api/v1/functions/{name}/schedules", json=body).status_code == 409
    patched = server.request("PATCH", f"/api/v1/functions/{name}/schedules/noon", json={"enabled": False})
    assert patched.status_code == 200 and patched.json()["enabled"] is False
    assert server.request("DELETE", f"/api/v1/functions/{name}/schedules/noon").status_code in (200, 204)
    assert server.request("GET", f"/api/v1/functions/{name}/schedules/noon").status_code == 404
    audit = server.request("GET", "/api/v1/audit", params={"limit": 20}).json()["entries"]
    assert {"schedule.create", "schedule.update", "schedule.delete"} <= {e["action"] for e in audit}


def test_a_schedule_payload_reaches_the_function(make_server: Callable[..., Server]) -> None:
    server = make_server()
    name = _deploy(server)
    server.request("POST", f"/api/v1/functions/{name}/schedules",
                   json={"name": "p", "expression": "rate(1 second)", "payload": {"k": [1, 2]}})
    _wait_for(lambda: any(e["state"] == "succeeded" for e in _fired(server, name)))
    result = next(e["result"] for e in _fired(server, name) if e["state"] == "succeeded")
    assert result == {"k": [1, 2]}, json.dumps(result)
