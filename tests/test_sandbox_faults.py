"""Sandboxes killed from outside, through a real server.

A runtime SIGKILLed while its instance starts (on every sandbox: the runtime process, or the
microVM's QEMU), or the template the namespace sandbox forks instances from, is a fault of
the platform, not of the function: the call is served by a new instance (a new template), or
fails as the sandbox (502 ``Sandbox.StartFailed``), and is never an init failure of the
function replayed to later callers.  A real init failure (the module raises at import, or
the runtime ends itself) still is one.  The driver-level cases are in
``tests/sandbox/test_namespace.py``.  The functions here opt out of init once, fork many
(``init_once: false``): their instances each run their init, from the shared template;
version templates are covered by ``tests/test_init_once.py``.

Only processes of the server under test are signalled (found under its own process tree).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import os
import re
import signal
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from impuls.engine.pool import START_ATTEMPTS
from impuls.runtimes import default_registry
from tests.helpers import Server, sandbox_unavailable
from tests.sandbox.test_namespace import cmdline, gone, sigkill, template_processes

#: a module that takes 2 s to load (time enough to kill its runtime in the middle of it)
SLOW_START = "import time\ntime.sleep(2)\n\n\ndef handler(event, context):\n    return 'ok'\n"
QUICK = "def handler(event, context):\n    return event\n"
#: prints a token of its own start, then fails to load
BROKEN = "import uuid\nprint('start', uuid.uuid4().hex, flush=True)\nimport nope_not_a_module\n"
#: ends its runtime itself while it loads (no init error reported): an init failure
EXITS = "import os\nprint('exiting', flush=True)\nos._exit(3)\n"
#: on the command line of the processes signalled here
RUNTIME, TEMPLATE = b"/var/runtime/bootstrap.py", b"/var/runtime/zygote.py"
#: the process sandbox's runtime runs the client from the host; a microVM instance's QEMU is
#: named after it (a snapshot template's is ``impuls-template-...``)
HOST_RUNTIME, VM_NAME = str(default_registry().resolve("python3.11").bootstrap).encode(), b"impuls-"
SANDBOXES = [pytest.param("namespace", marks=pytest.mark.namespace), "process",
             pytest.param("microvm", marks=pytest.mark.microvm)]


def start(make_server: Callable[..., Server], request: pytest.FixtureRequest, kind: str) -> Server:
    reason = sandbox_unavailable(kind, request)
    if reason:
        pytest.skip(f"{kind} sandbox unavailable: {reason}")
    env = {"IMPULS_IMAGES_DIR": str(request.getfixturevalue("images_dir"))} if kind == "microvm" else None
    return make_server(env=env, args=["--sandbox", kind])


@pytest.fixture
def server(make_server: Callable[..., Server], request: pytest.FixtureRequest) -> Server:
    return start(make_server, request, "namespace")


@pytest.fixture(params=SANDBOXES)
def on_sandbox(make_server: Callable[..., Server], request: pytest.FixtureRequest) -> Iterator[
        tuple[str, Server]]:
    """(sandbox, a server on it), for each sandbox."""
    yield request.param, start(make_server, request, request.param)


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (by parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return [pid for pid in found if not gone(pid)]


def runtimes(server: Server) -> list[int]:
    """The runtime processes of the server's instances (each runs the runtime client)."""
    assert server.proc is not None
    return [pid for pid in descendants(server.proc.pid)
            if RUNTIME in (argv := cmdline(pid)) and argv[:1] != [b"/usr/bin/bwrap"]]


def starting(kind: str, server: Server) -> list[tuple[int, bytes]]:
    """What a kill of an instance while it starts hits on ``kind``, as (pid, a piece of its
    command line): the runtime processes, or each microVM instance's QEMU."""
    assert server.proc is not None
    if kind == "namespace":
        return [(pid, RUNTIME) for pid in runtimes(server)]
    if kind == "process":
        return [(pid, HOST_RUNTIME) for pid in descendants(server.proc.pid)
                if HOST_RUNTIME in cmdline(pid)[1:2]]
    found = []
    for pid in descendants(server.proc.pid):
        argv = cmdline(pid)
        if argv[0].endswith(b"qemu-system-x86_64") and b"-name" in argv:
            name = argv[argv.index(b"-name") + 1]
            if name.startswith(VM_NAME) and not name.startswith(VM_NAME + b"template-"):
                found.append((pid, name))
    return found


def template_of(server: Server) -> int:
    assert server.proc is not None
    found = template_processes(descendants(server.proc.pid))
    assert len(found) == 1, found
    return found[0]


def until(ready: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll ``ready()`` until it is true (a liveness bound, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout:.0f} s"
        time.sleep(0.01)
    return value


def records(server: Server, name: str, count: int) -> list[dict[str, Any]]:
    """The function's invocation records, newest first, once ``count`` of them are written."""
    def written() -> list[dict[str, Any]] | None:
        found = server.request("GET", f"/api/v1/functions/{name}/invocations").json()["invocations"]
        return found if len(found) >= count else None
    result: list[dict[str, Any]] = until(written, f"{count} invocation records")
    return result


def test_a_runtime_killed_while_it_starts_is_started_again(on_sandbox: tuple[str, Server]) -> None:
    """On the microVM, QEMU is killed as soon as it is there: whichever step of the start that
    falls in (restore, boot, load, the module's import), it is the sandbox's death."""
    kind, server = on_sandbox
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=SLOW_START,
                         init_once=False)["name"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(server.invoke, name, {"n": 1})
        victim = until(lambda: starting(kind, server) or call.done(), "the instance to start", 180)
        assert not call.done() and len(victim) == 1
        assert sigkill(*victim[0])  # while it starts (the module sleeps 2 s at import)
        reply = call.result()
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status_code"] == 200 and body["body"] == "ok" and body["cold_start"] is True, body
    serving = starting(kind, server)
    assert victim[0] not in serving and len(serving) == 1  # another one serves
    (record,) = records(server, name, 1)
    assert record["outcome"] == "success" and "killed" in record["note"]
    again = server.invoke(name).json()  # not refused by a replayed init failure: warm, even
    assert again["status_code"] == 200 and again["cold_start"] is False


def test_a_runtime_killed_at_every_start_is_a_sandbox_error_never_replayed(
        on_sandbox: tuple[str, Server]) -> None:
    kind, server = on_sandbox
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=SLOW_START,
                         init_once=False)["name"]
    killed: set[int] = set()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(server.invoke, name)
        while not call.done():  # every start of this call has its runtime killed
            for pid, marker in starting(kind, server):
                if pid not in killed and sigkill(pid, marker):
                    killed.add(pid)
            time.sleep(0.01)
        reply = call.result()
    assert len(killed) == START_ATTEMPTS  # bounded: the first start and two more
    assert reply.status_code == 502, reply.text  # the platform's fault, not a function error
    body = reply.json()
    assert body["error_type"] == "Sandbox.StartFailed" and "SIGKILL" in body["error"], body
    # the next call starts an instance at once: no init failure is replayed to it
    after = server.invoke(name)
    assert after.status_code == 200 and after.json()["status_code"] == 200, after.text
    assert after.json()["cold_start"] is True
    outcomes = [r["outcome"] for r in records(server, name, 2)]
    assert outcomes == ["success", "crash"]


def test_a_runtime_that_ends_itself_while_it_starts_is_an_init_failure(
        on_sandbox: tuple[str, Server]) -> None:
    _, server = on_sandbox
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=EXITS)["name"]
    reply = server.invoke(name)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status_code"] == 500 and body["error_type"] == "Runtime.ExitError", body
    assert "exiting" in body["logs"]
    (record,) = records(server, name, 1)
    assert record["outcome"] == "init_error"


def unread_bytes(pid: int) -> int:
    """Bytes waiting unread in the sockets of process ``pid`` (each socket is copied here with
    pidfd_getfd, asked with FIONREAD, and closed again: a copy left open would keep it alive)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd_getfd = 438  # x86-64
    total = 0
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            copy = libc.syscall(pidfd_getfd, pidfd, int(fd), 0)
            if copy < 0:
                continue
            try:
                total += int.from_bytes(fcntl.ioctl(copy, termios.FIONREAD, b"\0" * 4), "little")
            finally:
                os.close(copy)
    finally:
        os.close(pidfd)
    return total


@pytest.mark.parametrize("kind", [pytest.param("namespace", marks=pytest.mark.namespace), "process"])
def test_a_call_handed_to_an_instance_that_died_idle_goes_to_another(
        make_server: Callable[..., Server], request: pytest.FixtureRequest, kind: str) -> None:
    """A warm instance's runtime dies while idle, and the server hands it the next call before it
    has seen it die: the runtime never read the call, so the call is served by another instance
    (never 502).  To hold that race open, the runtime is stopped (SIGSTOP) while it waits for a
    call, the call is written to its socket, and only then is it killed."""
    server = start(make_server, request, kind)
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=QUICK)["name"]
    assert server.invoke(name, {"n": 0}).json()["status_code"] == 200
    (runtime,) = [pid for pid, _ in starting(kind, server)]
    os.kill(runtime, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(server.invoke, name, {"n": 1})
            until(lambda: unread_bytes(runtime) > 0, "the call to reach the stopped runtime's socket")
            assert not call.done()
            assert sigkill(runtime, HOST_RUNTIME if kind == "process" else RUNTIME)
            reply = call.result()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(runtime, signal.SIGCONT)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status_code"] == 200 and body["body"] == {"n": 1} and body["cold_start"] is True, body
    record = records(server, name, 2)[0]
    assert record["outcome"] == "success" and "died before it read the call" in record["note"], record


@pytest.mark.namespace
def test_a_real_init_error_is_still_reported_and_replayed(server: Server) -> None:
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=BROKEN,
                         init_once=False)["name"]
    starts = []
    for _ in range(6):  # the back-off doubles from 1 s: some of these calls are replays
        reply = server.invoke(name)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status_code"] == 500 and body["error_type"] == "Runtime.ImportModuleError", body
        starts += re.findall(r"start ([0-9a-f]{32})", body["logs"])
    assert len(starts) == 6  # every reply carries the output of the start it reports
    assert len(set(starts)) < len(starts), "the init failure was not replayed"
    assert {r["outcome"] for r in records(server, name, 6)} == {"init_error"}


@pytest.mark.namespace
def test_cold_starts_after_the_template_was_killed_succeed(server: Server) -> None:
    names = [server.deploy(runtime="python3.11", handler="handler.handler", code=QUICK,
                           init_once=False)["name"]
             for _ in range(9)]
    warm = names.pop()
    assert server.invoke(warm, {"n": 0}).json()["status_code"] == 200
    auth = {"Authorization": f"Bearer {server.admin_key}"}

    def invoke(name: str) -> httpx.Response:
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
            return client.post(f"/api/v1/functions/{name}/invoke", json={"name": name})

    # the template dies while some cold starts are under way: each of those is served, or its
    # instance died with the template after it started (502 Runtime.ExitError, as any instance
    # that dies during a call) -- never an init failure, never a start that failed
    template = template_of(server)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        racing = [pool.submit(invoke, name) for name in names[:4]]
        assert sigkill(template, TEMPLATE)
        for reply in (r.result() for r in racing):
            body = reply.json()
            assert (reply.status_code, body.get("status_code")) in ((200, 200), (502, 502)), reply.text
            assert reply.status_code == 200 or body["error_type"] == "Runtime.ExitError", body
    until(lambda: gone(template), "the template to be gone")

    # later cold starts find it dead, and a new one serves them
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(invoke, names[4:]))
    for name, reply in zip(names[4:], replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["status_code"] == 200 and reply.json()["body"] == {"name": name}
    assert template_of(server) != template
    # the warm instance died with its template (it lived in its pid namespace): a new one serves
    again = server.invoke(warm, {"n": 1})
    assert again.status_code == 200 and again.json()["body"] == {"n": 1}, again.text
    assert "the template process died" in server.log()


@pytest.mark.namespace
def test_cold_starts_after_the_templates_lookalikes_were_killed_succeed(server: Server) -> None:
    """The pre-built slots' processes waiting to become runtimes show the template's command
    line (they are forked from it), so whatever kills the template by its name kills them
    too.  Slots without them are never used: every cold start succeeds."""
    names = [server.deploy(runtime="python3.11", handler="handler.handler", code=QUICK,
                           init_once=False)["name"]
             for _ in range(7)]
    warm = names.pop()
    assert server.invoke(warm, {"n": 0}).json()["status_code"] == 200
    assert server.proc is not None
    server_pid, template = server.proc.pid, template_of(server)
    lookalikes = until(lambda: [pid for pid in descendants(server_pid)
                                if cmdline(pid)[:2] == cmdline(template)[:2] and pid != template],
                       "the pool of slots")
    for pid in lookalikes:  # (a slot being built is among them a moment: it may be gone)
        sigkill(pid, TEMPLATE)
    until(lambda: all(gone(pid) for pid in lookalikes), "the slots' processes to be gone")
    for name in names:
        reply = server.invoke(name, {"name": name})
        assert reply.status_code == 200, reply.text
        assert reply.json()["status_code"] == 200 and reply.json()["body"] == {"name": name}
    assert template_of(server) == template  # the template itself serves on
    again = server.invoke(warm, {"n": 1}).json()
    assert again["status_code"] == 200 and again["cold_start"] is False  # untouched
