"""Asynchronous events are at-least-once: an accepted event is never lost.

A 202 is answered only once the event is committed, so a server killed with SIGKILL right
after a burst of accepted events delivers every one of them after a restart on the same data
directory (duplicates are allowed, and counted in the events' ``duplicates``).  A runtime that
exits mid-call, an instance killed under the call and a sandbox that cannot start instances do
not lose events either.  Each test runs on SQLite and on PostgreSQL.

The functions run in the ``process`` sandbox so that they can leave marks in a host directory
the test reads (which deliveries started, which process to kill).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.event_fixtures import (
    ECHO,
    EVENT_ENV,
    FAIL,
    FINAL,
    deliveries,
    deploy,
    event_of,
    event_raw,
    last_result,
    new_client,
    poll,
    put_config,
    send,
    send_raw,
    wait_event,
)
from tests.helpers import Server

PROCESS = ["--sandbox", "process"]
BURST = 500

#: sleeps 0.2 s; every start is appended to RUNS/starts (one request id a line)
SLOW_RECORDING = """
import os, time
RUNS = {runs!r}
def handler(event, context):
    fd = os.open(os.path.join(RUNS, "starts"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (context.aws_request_id + "\\n").encode())
    os.close(fd)
    time.sleep(0.2)
    return {{"request_id": context.aws_request_id, "i": event["i"]}}
"""

#: the first delivery of each event exits the runtime; the next one succeeds
CRASH_ONCE = """
import os
MARKS = {marks!r}
def handler(event, context):
    mark = os.path.join(MARKS, context.aws_request_id)
    if not os.path.exists(mark):
        open(mark, "w").close()
        print("exiting", flush=True)
        os._exit(3)
    return {{"event": event, "request_id": context.aws_request_id}}
"""

#: the first delivery of each event writes its pid and waits to be killed; the next one succeeds
KILLED_ONCE = """
import os, time
MARKS = {marks!r}
def handler(event, context):
    mark = os.path.join(MARKS, context.aws_request_id)
    if not os.path.exists(mark):
        with open(mark + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(mark + ".tmp", mark)
        time.sleep(60)
    return {{"event": event, "request_id": context.aws_request_id}}
"""


def restart(server: Server, make_server: Callable[..., Server], env: dict[str, str],
            args: list[str]) -> Server:
    """A new server on ``server``'s data directory and store, with the same admin key."""
    return make_server(env={**env, "IMPULS_ADMIN_KEY": server.admin_key}, args=args,
                       data_dir=server.data_dir)


# --- 202 only after commit ------------------------------------------------------------------------


@pytest.mark.timeout(1200)
def test_burst_of_accepted_events_survives_sigkill(make_server: Callable[..., Server],
                                                   store_env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**store_env, **EVENT_ENV}
    server = make_server(env=env, args=PROCESS)
    name = deploy(server, SLOW_RECORDING.format(runs=str(runs)), prefix="burst", timeout_sec=60)

    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def accept(i: int) -> tuple[int, int, str]:
        if not hasattr(local, "client"):
            local.client = new_client(server)
            with lock:
                clients.append(local.client)
        r = send_raw(server, name, {"i": i}, client=local.client)
        return i, r.status_code, r.text

    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(accept, range(BURST)))
    finally:
        for client in clients:
            client.close()
    refused = [(i, status, text[:200]) for i, status, text in answers if status != 202]
    assert not refused, f"{len(refused)} of {BURST} events not accepted, e.g. {refused[:5]}"
    accepted = {json.loads(text)["request_id"]: i for i, _, text in answers}
    assert len(accepted) == BURST, "request ids must be unique"
    server.kill()  # right after the last 202

    again = restart(server, make_server, env, PROCESS)
    missing = [rid for rid in accepted if event_raw(again, name, rid).status_code == 404]
    assert not missing, f"{len(missing)} accepted events lost by SIGKILL, e.g. {missing[:5]}"

    pending = set(accepted)
    records: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 900
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            ev = event_of(again, name, rid)
            if ev["state"] in FINAL:
                records[rid] = ev
                pending.discard(rid)
        if pending:
            time.sleep(1)
    duplicates = sum(ev["duplicates"] for ev in records.values())
    summary = f"(duplicates counted so far: {duplicates})"
    assert not pending, f"{len(pending)} accepted events never finished {summary}, e.g. {sorted(pending)[:5]}"
    unhappy = {rid: ev["state"] for rid, ev in records.items() if ev["state"] != "succeeded"}
    assert not unhappy, f"{len(unhappy)} events did not succeed {summary}: {list(unhappy.items())[:5]}"
    for rid, ev in records.items():
        assert ev["duplicates"] >= 0, ev
        assert last_result(ev) == {"request_id": rid, "i": accepted[rid]}, ev

    # Every delivery that ran more than once is counted as a (possible) duplicate.
    starts = Counter((runs / "starts").read_text().split())
    assert set(starts) <= set(accepted), "a function saw a request id no 202 answered"
    uncounted = {rid: (n, records[rid]["duplicates"]) for rid, n in starts.items()
                 if n - 1 > records[rid]["duplicates"]}
    assert not uncounted, (f"events that ran more often than counted {summary}: "
                           f"{list(uncounted.items())[:5]} (request id: (runs, duplicates))")
    print(f"{BURST} events after SIGKILL: all succeeded; duplicates counted: {duplicates}; "
          f"extra runs seen: {sum(n - 1 for n in starts.values())}")


@pytest.mark.timeout(600)
def test_event_waiting_for_a_retry_survives_sigkill(make_server: Callable[..., Server],
                                                    store_env: dict[str, str]) -> None:
    # a long retry delay, so that the server is killed while the event waits for its retry
    env = {**store_env, **EVENT_ENV, "IMPULS_EVENT_RETRY_BASE_SECONDS": "3"}
    server = make_server(env=env, args=PROCESS)
    name = deploy(server, FAIL)
    rid = send(server, name, {"retry": "me"})
    poll(lambda: event_of(server, name, rid), lambda ev: len(deliveries(ev)) >= 1,
         what="the first delivery")
    server.kill()

    again = restart(server, make_server, env, PROCESS)
    ev = wait_event(again, name, rid, timeout=300)
    assert ev["state"] == "failed", ev
    # 1 + 2 retries; a delivery cut short by the kill may be repeated, and is then counted
    assert 3 <= ev["attempts"] <= 3 + ev["duplicates"], ev
    runs = deliveries(ev)
    assert len(runs) >= 3 and all(h["outcome"] == "error" for h in runs), ev
    assert all(f"rid={rid} " in h["error"] for h in runs), ev  # one request id across the restart


# --- crashes and sandbox errors ------------------------------------------------------------------


def test_runtime_exiting_mid_call_does_not_lose_the_event(make_server: Callable[..., Server],
                                                          store_env: dict[str, str], tmp_path: Path) -> None:
    server = make_server(env={**store_env, **EVENT_ENV}, args=PROCESS)
    name = deploy(server, CRASH_ONCE.format(marks=str(tmp_path)))
    rid = send(server, name, {"x": 1})
    ev = wait_event(server, name, rid)
    assert ev["state"] == "succeeded", ev
    assert ev["attempts"] == 2, ev
    first, second = deliveries(ev)
    assert first["outcome"] == "crash" and first["error_type"] == "Runtime.ExitError", ev
    assert second["outcome"] == "success", ev
    assert last_result(ev) == {"event": {"x": 1}, "request_id": rid}, ev


def test_instance_killed_under_the_call_does_not_lose_the_event(make_server: Callable[..., Server],
                                                               store_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    server = make_server(env={**store_env, **EVENT_ENV}, args=PROCESS)
    name = deploy(server, KILLED_ONCE.format(marks=str(tmp_path)), timeout_sec=120)
    rid = send(server, name, {"x": 2})
    mark = tmp_path / rid
    poll(mark.exists, bool, what="the first delivery running")
    pid = int(mark.read_text())
    assert pid in server.processes_in_data_dir(), "the runtime process is the server's instance"
    os.kill(pid, signal.SIGKILL)  # what an OOM killer or a failing sandbox does to an instance

    ev = wait_event(server, name, rid)
    assert ev["state"] == "succeeded", ev
    assert ev["attempts"] == 2, ev
    first, second = deliveries(ev)
    assert first["outcome"] != "success" and second["outcome"] == "success", ev
    assert last_result(ev) == {"event": {"x": 2}, "request_id": rid}, ev


def test_sandbox_that_cannot_start_instances_does_not_lose_the_event(
        make_server: Callable[..., Server], store_env: dict[str, str]) -> None:
    server = make_server(env={**store_env, **EVENT_ENV}, args=PROCESS)
    # Break the process sandbox from outside: its scratch directory becomes a file, so no
    # instance can be created (Sandbox.StartFailed) until it is a directory again.
    scratch = [p for p in server.data_dir.rglob("scratch") if p.is_dir()]
    assert len(scratch) == 1, f"the process sandbox's scratch directory: {scratch}"
    away = scratch[0].with_name("scratch.away")
    probe = deploy(server, ECHO, prefix="probe")
    name = deploy(server, ECHO)
    # a sandbox fault is not the function's: it must not spend the event's (zero) retries
    put_config(server, name, maximum_retry_attempts=0)
    scratch[0].rename(away)
    scratch[0].write_text("")
    try:
        r = server.invoke(probe, {})
        assert r.status_code >= 500 and r.json()["error_type"] == "Sandbox.StartFailed", r.text

        rid = send(server, name, {"x": 3})

        def hit() -> bool:  # the delivery reached the broken sandbox
            ev = event_of(server, name, rid)
            assert ev["state"] not in ("succeeded", "failed"), ev
            records = server.request("GET", f"/api/v1/functions/{name}/invocations").json()["invocations"]
            return (any(rec["request_id"] == rid and rec["error_type"] == "Sandbox.StartFailed"
                        for rec in records) or bool(ev["history"]) or ev["state"] == "retrying")

        poll(hit, bool, what="a delivery into the broken sandbox")
    finally:
        scratch[0].unlink()
        away.rename(scratch[0])

    ev = wait_event(server, name, rid)
    assert ev["state"] == "succeeded", ev
    assert deliveries(ev)[-1]["outcome"] == "success", ev
    assert last_result(ev) == {"event": {"x": 3}, "request_id": rid, "version": "$LATEST"}, ev
