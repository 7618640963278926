"""Init once, fork many (docs/init-once.md), through a real server on the namespace sandbox.

A Python function's init runs once per version, in a version template, and its instances
are forked from it: each still has its own randomness, request ids, ``/tmp`` and
processes; a function that opts out (``init_once: false``) runs its init per instance;
an update retires the template; a failed or crashed init ends as it always has.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import Server, sandbox_unavailable
from tests.sandbox.test_namespace import cmdline, sigkill
from tests.test_sandbox_faults import descendants, until

pytestmark = pytest.mark.namespace

#: reports what makes an instance unique, and its view of /tmp and of processes; holds
#: the call for ``hold`` seconds (so that concurrent calls need instances of their own)
UNIQUE = """\
import os, random, tempfile, time, uuid

INIT_PID = os.getpid()
INIT_TOKEN = uuid.uuid4().hex  # made once, at import: the same in every forked instance
random.random()  # the generators' state is part of what the template holds
tempfile.mktemp()


def handler(event, context):
    mine = f"/tmp/{context.aws_request_id}"
    with open(mine, "w") as f:
        f.write("x")
    time.sleep(event.get("hold", 0))
    return {
        "random": random.random(), "urandom": os.urandom(16).hex(), "uuid": uuid.uuid4().hex,
        "tempname": tempfile.mktemp(),
        "request_id": context.aws_request_id, "init_token": INIT_TOKEN,
        "tmp": sorted(os.listdir("/tmp")), "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
        "log_stream": context.log_stream_name,
    }
"""
#: counts its inits in a file of its own /tmp
COUNTED = """\
import os, time, uuid

time.sleep({sleep})
with open("/tmp/inits", "a") as f:
    f.write("init\\n")
TOKEN = uuid.uuid4().hex


def handler(event, context):
    time.sleep(event.get("hold", 0))
    with open("/tmp/inits") as f:
        inits = f.read().count("init")
    return {{"token": TOKEN, "inits": inits, "version": "{version}"}}
"""
#: Lambda's runtime hooks: one before the "snapshot" (the template), one after each "restore"
HOOKS = """\
import time, uuid
from snapshot_restore_py import register_after_restore, register_before_snapshot

state = {"before": [], "after": []}


@register_before_snapshot
def before():
    state["before"].append(uuid.uuid4().hex)


def after(tag):
    state["after"].append(tag + uuid.uuid4().hex)


register_after_restore(after, "instance-")


def handler(event, context):
    time.sleep(event.get("hold", 0))
    return state
"""
FAILS = "import uuid\nprint('start', uuid.uuid4().hex, flush=True)\nraise ValueError('bad config')\n"
CRASHES = "import os\nprint('crashing', flush=True)\nos._exit(3)\n"


@pytest.fixture
def server(make_server: Callable[..., Server], request: pytest.FixtureRequest) -> Iterator[Server]:
    reason = sandbox_unavailable("namespace", request)
    if reason:
        pytest.skip(f"namespace sandbox unavailable: {reason}")
    yield make_server(args=["--sandbox", "namespace"])


def invoke_all(server: Server, name: str, events: list[dict[str, Any]],
               qualifier: str = "") -> list[dict[str, Any]]:
    """Call ``name`` once per event, all at once (each on a client of its own)."""
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    path = f"/api/v1/functions/{name}/invoke" + (f"?qualifier={qualifier}" if qualifier else "")

    def call(event: dict[str, Any]) -> dict[str, Any]:
        with httpx.Client(base_url=server.url, headers=auth, timeout=120) as client:
            reply = client.post(path, json=event)
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        assert body["status_code"] == 200, body
        return body

    with concurrent.futures.ThreadPoolExecutor(len(events)) as pool:
        return list(pool.map(call, events))


def first_then_forked(server: Server, name: str, qualifier: str = "",
                      hold: float = 2.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first call of a version (a cold start that runs its own init while the version
    template starts), then three at once, each holding its instance for ``hold`` seconds
    (long enough for all three to arrive while the others hold theirs): one takes the warm
    instance, two are new instances, forked from the template.  (first reply, the two
    forked replies' bodies)"""
    params = {"qualifier": qualifier} if qualifier else {}
    first: dict[str, Any] = server.invoke(name, {}, **params).json()
    assert first["status_code"] == 200 and first["cold_start"] is True, first
    replies = invoke_all(server, name, [{"hold": hold}] * 3, qualifier)
    forked = [r["body"] for r in replies if r["cold_start"]]
    assert len(forked) == 2, replies
    return first, forked


def test_instances_forked_from_one_template_are_unique(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=UNIQUE)["name"]
    first, forked = first_then_forked(server, name)
    # one init made the state both forked instances start from; the first call ran its own
    assert forked[0]["init_token"] == forked[1]["init_token"] != first["body"]["init_token"]
    for key in ("random", "urandom", "uuid", "tempname", "request_id", "log_stream"):
        assert forked[0][key] != forked[1][key], (key, forked)
    for body in forked:  # each sees its own /tmp (only its own call's file) and its own pids
        assert body["tmp"] == [body["request_id"]], body
        assert body["pids"] == forked[0]["pids"] and len(body["pids"]) <= 3, body


def test_an_opted_out_function_runs_its_init_per_instance(server: Server) -> None:
    code = COUNTED.format(sleep=0, version="v1")
    opted_out = server.deploy(runtime="python3.11", handler="handler.handler", code=code,
                              init_once=False)
    assert opted_out["init_once"] is False
    first, others = first_then_forked(server, opted_out["name"])
    assert len({first["body"]["token"], *(b["token"] for b in others)}) == 3  # three imports
    assert [b["inits"] for b in [first["body"], *others]] == [1, 1, 1]  # each in its own /tmp
    default = server.deploy(runtime="python3.11", handler="handler.handler", code=code)
    assert default["init_once"] is True
    first, forked = first_then_forked(server, default["name"])
    assert forked[0]["token"] == forked[1]["token"] != first["body"]["token"]  # one more import
    # each forked instance's /tmp starts as a copy of what the template's init left there
    assert [b["inits"] for b in forked] == [1, 1]


def test_an_update_retires_the_template(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler",
                         code=COUNTED.format(sleep=0, version="v1"))["name"]
    first, old = first_then_forked(server, name)
    assert {b["version"] for b in old} == {"v1"}
    reply = server.request("PATCH", f"/api/v1/functions/{name}",
                           json={"code": COUNTED.format(sleep=0, version="v2")})
    assert reply.status_code == 200, reply.text
    first, new = first_then_forked(server, name)
    assert first["body"]["version"] == "v2" and {b["version"] for b in new} == {"v2"}
    assert new[0]["token"] != old[0]["token"]  # the new code's init ran; the old state is gone
    # a configuration change (no new code) is a new template too: a new init
    reply = server.request("PATCH", f"/api/v1/functions/{name}", json={"environment": {"A": "1"}})
    assert reply.status_code == 200, reply.text
    _, again = first_then_forked(server, name)
    assert again[0]["token"] not in (new[0]["token"], old[0]["token"])


def test_runtime_hooks_run_before_the_template_and_in_each_instance(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=HOOKS)["name"]
    first, forked = first_then_forked(server, name)
    assert first["body"] == {"before": [], "after": []}  # its own init: no hook runs
    for state in forked:  # the before hook ran once, in the template; the after hook once here
        assert state["before"] == forked[0]["before"] and len(state["before"]) == 1, forked
        assert len(state["after"]) == 1 and state["after"][0].startswith("instance-"), forked
    assert forked[0]["after"] != forked[1]["after"]


def templates(server: Server) -> list[int]:
    """The server's version template processes (named ``impuls-template <id>``)."""
    assert server.proc is not None
    return [pid for pid in descendants(server.proc.pid) if cmdline(pid)[:1] == [b"impuls-template"]]


def test_versions_have_templates_of_their_own_and_a_delete_ends_them(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler",
                         code=COUNTED.format(sleep=0, version="v1"))["name"]
    _, latest = first_then_forked(server, name)
    assert server.request("POST", f"/api/v1/functions/{name}/versions").status_code == 201
    _, published = first_then_forked(server, name, qualifier="1")
    assert published[0]["token"] == published[1]["token"] != latest[0]["token"]
    assert len(templates(server)) == 2
    assert server.request("DELETE", f"/api/v1/functions/{name}").status_code in (200, 204)
    until(lambda: not templates(server), "the deleted function's templates to end")


def test_a_template_killed_during_its_init_is_never_used(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler",
                         code=COUNTED.format(sleep=2, version="v1"))["name"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(server.invoke, name, {})
        (template,) = until(lambda: templates(server), "the version template to start")
        assert sigkill(template, b"impuls-template")  # while its import sleeps
        first = call.result().json()
    assert first["status_code"] == 200 and first["cold_start"] is True, first  # unharmed
    # the next cold starts run their own init (the failed template is not retried for 30 s)
    replies = invoke_all(server, name, [{"hold": 2.0}] * 3)
    cold = [r["body"]["token"] for r in replies if r["cold_start"]]
    assert len(cold) == 2 and len({*cold, first["body"]["token"]}) == 3, replies
    assert not templates(server)


def test_idle_templates_are_reaped(make_server: Callable[..., Server],
                                   request: pytest.FixtureRequest) -> None:
    reason = sandbox_unavailable("namespace", request)
    if reason:
        pytest.skip(f"namespace sandbox unavailable: {reason}")
    server = make_server(env={"IMPULS_IDLE_TIMEOUT": "1"}, args=["--sandbox", "namespace"])
    name = server.deploy(runtime="python3.11", handler="handler.handler",
                         code=COUNTED.format(sleep=0, version="v1"))["name"]
    assert server.invoke(name, {}).json()["cold_start"] is True
    until(lambda: templates(server), "the version template")
    until(lambda: not templates(server), "the idle template to be reaped")


def error_of(server: Server, name: str) -> dict[str, Any]:
    reply = server.invoke(name)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    assert body["status_code"] == 500, body
    return body


@pytest.mark.parametrize("init_once", [True, False])
def test_a_failed_init_is_reported_as_it_always_was(server: Server, init_once: bool) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=FAILS,
                         init_once=init_once)["name"]
    body = error_of(server, name)
    assert body["error_type"] == "ValueError" and body["error"] == "bad config", body
    assert body["logs"].count("start ") == 1  # the output of the one init that failed
    again = error_of(server, name)  # replayed for a while, as before
    assert again["error_type"] == "ValueError"


@pytest.mark.parametrize("init_once", [True, False])
def test_a_crashed_init_is_reported_as_it_always_was(server: Server, init_once: bool) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=CRASHES,
                         init_once=init_once)["name"]
    body = error_of(server, name)
    assert body["error_type"] == "Runtime.ExitError", body
    assert "crashing" in body["logs"] and "3" in body["error"], body


def test_later_cold_starts_do_not_run_a_slow_init_again(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler",
                         code=COUNTED.format(sleep=1, version="v1"))["name"]
    started = time.monotonic()
    first = server.invoke(name, {}).json()
    assert first["cold_start"] is True and time.monotonic() - started >= 1.0  # the init ran
    # one more call at a time than there are instances: each round starts a new instance,
    # forked from the template (whose init ran alongside the first call's), so no start
    # sleeps its 1 s at import again
    hold = 0.2
    tokens: set[str] = set()
    for calls in (2, 3, 4):

        def call(event: dict[str, Any]) -> tuple[float, dict[str, Any]]:
            began = time.monotonic()
            (body,) = invoke_all(server, name, [event])
            return time.monotonic() - began, body

        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            timed = list(pool.map(call, [{"hold": hold}] * calls))
        cold = [(elapsed, body) for elapsed, body in timed if body["cold_start"]]
        assert cold, timed
        tokens.update(body["body"]["token"] for _, body in cold)
        for elapsed, _ in cold:
            assert elapsed < 1.0 + hold, timed  # less than its init alone would take
    assert len(tokens) == 1 and first["body"]["token"] not in tokens  # all from one template
