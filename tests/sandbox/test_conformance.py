"""The sandbox driver conformance suite: every driver must pass all of it.

Each test drives a real driver (real processes, real namespaces, real VMs)
through the contract in :mod:`impuls.sandbox.base`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from impuls import config
from impuls.errors import InitFailed, InvocationTimedOut, RuntimeExited, SandboxStartFailed
from impuls.runtimes import default_registry
from impuls.sandbox import make_driver
from impuls.sandbox.base import Instance, InstanceSpec, SandboxDriver
from impuls.sandbox.runtime_api import (
    HTTP_INTEGRATION_CONTENT_TYPE,
    Invocation,
    ResponseStream,
    RuntimeReply,
)
from tests.helpers import invocation, processes_with
from tests.sandbox.conftest import SpecFactory, run

RUNTIME_VARS = {
    "AWS_LAMBDA_RUNTIME_API", "_HANDLER", "LAMBDA_TASK_ROOT", "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_REGION", "TZ", "TMPDIR", "PATH", "LANG",
}
# variables the runtimes themselves set while running (as Lambda's do)
RUNTIME_SET = {"_X_AMZN_TRACE_ID", "PWD", "SHLVL", "_"}

PY_OK = """
import os
print("init output")
COUNT = 0
def handler(event, context):
    global COUNT
    COUNT += 1
    print("called", COUNT)
    if event.get("env"):
        return dict(os.environ)
    if event.get("tmp"):
        path = os.path.join(os.environ["TMPDIR"], "x")
        open(path, "w").write("ok")
        return open(path).read()
    if event.get("raise"):
        raise ValueError("bad " + event["raise"])
    if event.get("sleep"):
        import time
        time.sleep(event["sleep"])
    if event.get("spawn"):
        import subprocess
        subprocess.Popen(["sleep", event["spawn"]], start_new_session=True)
        return "spawned"
    if event.get("exit"):
        print("about to die", flush=True)
        os._exit(3)
    return {"count": COUNT, "echo": event, "request_id": context.aws_request_id}
"""

NODE_OK = """
let count = 0;
console.log("init output");
exports.handler = async (event, context) => {
  count += 1;
  console.log("called", count);
  if (event.env) return process.env;
  if (event.raise) throw new TypeError("bad " + event.raise);
  if (event.sleep) await new Promise(r => setTimeout(r, event.sleep * 1000));
  if (event.exit) { console.log("about to die"); process.exit(3); }
  return { count, echo: event, request_id: context.awsRequestId };
};
"""


GO_OK = """package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

var count = 0

func init() { fmt.Println("init output") }

func Handler(ctx context.Context, event map[string]interface{}) (interface{}, error) {
	count++
	fmt.Println("called", count)
	if event["env"] != nil {
		env := map[string]string{}
		for _, kv := range os.Environ() {
			parts := strings.SplitN(kv, "=", 2)
			env[parts[0]] = parts[1]
		}
		return env, nil
	}
	if s, ok := event["raise"].(string); ok {
		return nil, errors.New("bad " + s)
	}
	if s, ok := event["sleep"].(float64); ok {
		time.Sleep(time.Duration(s * float64(time.Second)))
	}
	if s, ok := event["spawn"].(string); ok {
		cmd := exec.Command("sleep", s)
		cmd.Start()
		return "spawned", nil
	}
	if event["exit"] != nil {
		fmt.Println("about to die")
		os.Exit(3)
	}
	return map[string]interface{}{"count": count, "echo": event}, nil
}
"""

JAVA_OK = """package example;

import com.amazonaws.services.lambda.runtime.Context;
import java.util.Map;
import java.util.TreeMap;

public class Handler {
    static int count = 0;
    static { System.out.println("init output"); }

    public Object handleRequest(Map<String, Object> event, Context context) throws Exception {
        count++;
        System.out.println("called " + count);
        if (event.containsKey("env")) return System.getenv();
        if (event.containsKey("raise")) throw new IllegalArgumentException("bad " + event.get("raise"));
        if (event.get("sleep") instanceof Number n) Thread.sleep((long) (n.doubleValue() * 1000));
        if (event.containsKey("spawn")) {
            new ProcessBuilder("sleep", (String) event.get("spawn")).start();
            return "spawned";
        }
        if (event.containsKey("exit")) {
            System.out.println("about to die");
            System.exit(3);
        }
        Map<String, Object> out = new TreeMap<>();
        out.put("count", count);
        out.put("echo", event);
        out.put("request_id", context.getAwsRequestId());
        return out;
    }
}
"""

RUBY_OK = """
puts "init output"
$count = 0
def handler(event:, context:)
  $count += 1
  puts "called #{$count}"
  return ENV.to_h if event["env"]
  raise TypeError, "bad #{event["raise"]}" if event["raise"]
  sleep(event["sleep"]) if event["sleep"]
  if event["exit"]
    puts "about to die"
    exit!(3)
  end
  { count: $count, echo: event, request_id: context.aws_request_id }
end
"""

CSHARP_OK = """
using System;
using System.Collections.Generic;
using System.Threading;
using Amazon.Lambda.Core;

namespace Conformance
{
    public class Function
    {
        int count;

        public Function() { Console.WriteLine("init output"); }

        public object Handler(Dictionary<string, object> input, ILambdaContext context)
        {
            count++;
            Console.WriteLine("called " + count);
            if (input.ContainsKey("env")) return Environment.GetEnvironmentVariables();
            if (input.ContainsKey("raise")) throw new ArgumentException("bad " + input["raise"]);
            if (input.ContainsKey("sleep")) Thread.Sleep((int)(Convert.ToDouble(input["sleep"]) * 1000));
            if (input.ContainsKey("exit"))
            {
                Console.WriteLine("about to die");
                Environment.Exit(3);
            }
            return new Dictionary<string, object> {
                { "count", count }, { "echo", input }, { "request_id", context.AwsRequestId } };
        }
    }
}
"""

# A custom runtime: Python by hand over the Runtime API, as a user could write one.
PROVIDED_OK = """#!/usr/bin/python3
import json, os, time, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
print("init output", flush=True)
count = 0
while True:
    with urllib.request.urlopen(api + "next") as resp:
        rid = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        event = json.loads(resp.read())
    count += 1
    print("called", count, flush=True)
    if event.get("exit"):
        print("about to die", flush=True)
        os._exit(3)
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("raise"):
        url, body = api + rid + "/error", {"errorType": "TypeError", "errorMessage": "bad " + event["raise"]}
    elif event.get("env"):
        url, body = api + rid + "/response", dict(os.environ)
    else:
        url, body = api + rid + "/response", {"count": count, "echo": event}
    urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode(), method="POST"))
"""


def driver_for(kind: str, work: Path) -> SandboxDriver:
    return make_driver(config.load({"sandbox": kind, "data_dir": work}), default_registry())


@contextlib.asynccontextmanager
async def running(kind: str, work: Path, spec: InstanceSpec) -> AsyncIterator[Instance]:
    """An instance of ``spec`` on a new ``kind`` driver; destroyed (and the driver closed) after."""
    driver = driver_for(kind, work)
    instance = await driver.create(spec)
    try:
        yield instance
    finally:
        await instance.destroy()
        await driver.close()


async def call(instance: Instance, event: object, timeout: float = 5.0) -> RuntimeReply:
    return await instance.invoke(invocation(event, timeout), timeout)


SOURCES = {"python3.11": {"handler.py": PY_OK}, "nodejs20": {"index.js": NODE_OK},
           "nodejs22": {"index.js": NODE_OK}, "go1.x": {"main.go": GO_OK},
           "java17": {"Handler.java": JAVA_OK}, "ruby3.1": {"function.rb": RUBY_OK},
           "dotnet-mono": {"Function.cs": CSHARP_OK}, "provided": {"bootstrap": PROVIDED_OK}}


@pytest.fixture(params=list(SOURCES))
def source(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    return request.param, SOURCES[request.param]


def test_ready_invoke_reuse_and_output(driver_kind: str, make_spec: SpecFactory, world_dir: Path,
                                       source: tuple[str, dict[str, str]]) -> None:
    runtime, files = source

    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(files, runtime=runtime)) as instance:
            first = await call(instance, {"n": 1})
            assert first.ok, first.body
            doc = json.loads(first.body)
            assert doc["count"] == 1 and doc["echo"] == {"n": 1}
            logs, _ = instance.output.take()
            assert "init output" in logs and "called 1" in logs
            second = json.loads((await call(instance, {"n": 2})).body)
            assert second["count"] == 2  # code loaded once, state kept
            logs, _ = instance.output.take()
            assert "called 2" in logs and "init output" not in logs

    run(scenario())


def test_clean_environment(driver_kind: str, make_spec: SpecFactory, world_dir: Path,
                           source: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, files = source
    monkeypatch.setenv("IMPULS_SERVER_SECRET", "do-not-leak")

    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(files, runtime=runtime)) as instance:
            env = json.loads((await call(instance, {"env": True})).body)
        assert env["FUNCTION_VAR"] == "fn-value"
        assert env["AWS_LAMBDA_FUNCTION_NAME"] == "conformance" and env["_HANDLER"]
        assert "IMPULS_SERVER_SECRET" not in env and "do-not-leak" not in json.dumps(env)
        assert "IMPULS_RUNTIME_API_SOCKET" not in env
        unexpected = set(env) - RUNTIME_VARS - RUNTIME_SET - {"FUNCTION_VAR"}
        assert not unexpected, unexpected

    run(scenario())


def test_scratch_directory_is_writable(driver_kind: str, make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec({"handler.py": PY_OK})) as instance:
            reply = await call(instance, {"tmp": True})
            assert reply.ok and json.loads(reply.body) == "ok"

    run(scenario())


def test_function_error_keeps_instance(driver_kind: str, make_spec: SpecFactory, world_dir: Path,
                                       source: tuple[str, dict[str, str]]) -> None:
    runtime, files = source

    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(files, runtime=runtime)) as instance:
            reply = await call(instance, {"raise": "input"})
            assert not reply.ok
            doc = json.loads(reply.body)
            assert doc["errorType"] in ("ValueError", "TypeError", "errorString", "ArgumentException",
                                        "java.lang.IllegalArgumentException")
            assert doc["errorMessage"] == "bad input"
            if runtime in ("python3.11", "nodejs20", "nodejs22", "java17", "ruby3.1", "dotnet-mono"):
                assert doc["stackTrace"]
            assert (await call(instance, {})).ok  # still serving

    run(scenario())


CONTEXT_HANDLERS = {
    "python3.11": {"handler.py": (
        "def handler(event, context):\n"
        "    cc = context.client_context\n"
        "    if cc is None:\n"
        "        return None\n"
        "    return {'custom': cc.custom, 'env': cc.env, 'installation': cc.client.installation_id,\n"
        "            'arn': context.invoked_function_arn}\n")},
    "nodejs20": {"index.js": (
        "exports.handler = async (event, context) => {\n"
        "  const cc = context.clientContext;\n"
        "  if (!cc) return null;\n"
        "  return {custom: cc.Custom, env: cc.env, installation: cc.client.installation_id,\n"
        "          arn: context.invokedFunctionArn};\n"
        "};\n")},
    "java17": {"Handler.java": (
        "package example;\n"
        "import com.amazonaws.services.lambda.runtime.ClientContext;\n"
        "import com.amazonaws.services.lambda.runtime.Context;\n"
        "import java.util.Map;\n"
        "public class Handler {\n"
        "    public Map<String, Object> handleRequest(Object event, Context context) {\n"
        "        ClientContext cc = context.getClientContext();\n"
        "        if (cc == null) return null;\n"
        "        return Map.of(\"custom\", cc.getCustom(), \"env\", cc.getEnvironment(),\n"
        "                      \"installation\", cc.getClient().getInstallationId(),\n"
        "                      \"arn\", context.getInvokedFunctionArn());\n"
        "    }\n"
        "}\n")},
}


@pytest.mark.parametrize("runtime", list(CONTEXT_HANDLERS))
def test_client_context_reaches_the_handler(driver_kind: str, make_spec: SpecFactory, world_dir: Path,
                                            runtime: str) -> None:
    """The engine's client context arrives as Lambda-Runtime-Client-Context: Python's
    ``context.client_context.custom``, Node's ``context.clientContext.Custom``."""
    context = {"client": {"installation_id": "inst-1"}, "custom": {"cart": "42"},
               "env": {"platform": "test"}}

    async def scenario() -> None:
        spec = make_spec(CONTEXT_HANDLERS[runtime], runtime=runtime)
        async with running(driver_kind, world_dir, spec) as inst:
            event = invocation({})
            event.client_context = json.dumps(context, separators=(",", ":"))
            event.function_arn += ":live"
            reply = await inst.invoke(event, 5.0)
            assert reply.ok, reply.body
            assert json.loads(reply.body) == {"custom": {"cart": "42"}, "env": {"platform": "test"},
                                              "installation": "inst-1", "arn": event.function_arn}
            assert json.loads((await call(inst, {})).body) is None  # the next call has none

    run(scenario())


JAVA_PLAIN = "package example;\npublic class Handler {\n    public String other(String s) { return s; }\n}\n"
JAVA_FAILING_INIT = ("package example;\npublic class Handler {\n"
                     "    static { if (true) throw new IllegalStateException(\"no config\"); }\n"
                     "    public String handle(String s) { return s; }\n}\n")


@pytest.mark.parametrize(
    ("runtime", "files", "handler", "error_type"),
    [
        ("python3.11", {"handler.py": "def handler(e, c)\n  return 1\n"}, "handler.handler",
         "Runtime.UserCodeSyntaxError"),
        ("python3.11", {"handler.py": "import no_such_module_x\n"}, "handler.handler",
         "Runtime.ImportModuleError"),
        ("python3.11", {"handler.py": "x = 1\n"}, "handler.handler", "Runtime.HandlerNotFound"),
        ("python3.11", {"handler.py": "x = 1\n"}, "missing.handler", "Runtime.ImportModuleError"),
        ("nodejs20", {"index.js": "exports.handler = async (e => 1;\n"}, "index.handler",
         "Runtime.UserCodeSyntaxError"),
        ("nodejs20", {"index.js": "require('no-such-module-x');\n"}, "index.handler",
         "Runtime.ImportModuleError"),
        ("nodejs20", {"index.js": "exports.other = 1;\n"}, "index.handler", "Runtime.HandlerNotFound"),
        # Java source errors fail the build (javac); these are the errors left for start-up
        ("java17", {"Handler.java": JAVA_PLAIN}, "example.Missing::other", "Runtime.ImportModuleError"),
        ("java17", {"Handler.java": JAVA_PLAIN}, "example.Handler::handle", "Runtime.HandlerNotFound"),
        ("java17", {"Handler.java": JAVA_PLAIN}, "example.Handler", "Runtime.HandlerNotFound"),
        ("java17", {"Handler.java": JAVA_FAILING_INIT}, "example.Handler::handle",
         "java.lang.IllegalStateException"),
        ("ruby3.1", {"function.rb": "def handler(event:, context:\n"}, "function.handler",
         "Runtime.UserCodeSyntaxError"),
        ("ruby3.1", {"function.rb": "require 'no_such_gem_x'\n"}, "function.handler",
         "Runtime.ImportModuleError"),
        ("ruby3.1", {"function.rb": "X = 1\n"}, "function.handler_x", "Runtime.HandlerNotFound"),
        ("ruby3.1", {"function.rb": "X = 1\n"}, "function.No::Such.handler", "Runtime.HandlerNotFound"),
        ("ruby3.1", {"function.rb": "X = 1\n"}, "missing.handler", "Runtime.ImportModuleError"),
        # C#: a syntax error fails the build (mcs), before any instance
        ("dotnet-mono", {"Function.cs": CSHARP_OK}, "Function::No.Such::Handler", "Runtime.HandlerNotFound"),
        ("dotnet-mono", {"Function.cs": CSHARP_OK}, "Function::Conformance.Function::Nope",
         "Runtime.HandlerNotFound"),
        ("dotnet-mono", {"Function.cs": "public class F {\n"
                                        "  public F() { throw new System.InvalidOperationException(); }\n"
                                        "  public int H() { return 1; } }\n"}, "Function::F::H",
         "InvalidOperationException"),
    ],
)
def test_init_errors(driver_kind: str, make_spec: SpecFactory, world_dir: Path, runtime: str,
                     files: dict[str, str], handler: str, error_type: str) -> None:
    async def scenario() -> None:
        driver = driver_for(driver_kind, world_dir)
        with pytest.raises(InitFailed) as info:
            await driver.create(make_spec(files, runtime=runtime, handler=handler))
        assert info.value.error_type == error_type, (info.value.error_type, info.value.logs)

    run(scenario())


def test_timeout_then_destroy(driver_kind: str, make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        driver = driver_for(driver_kind, world_dir)
        instance = await driver.create(make_spec({"handler.py": PY_OK}))
        started = time.monotonic()
        with pytest.raises(InvocationTimedOut):
            await call(instance, {"sleep": 30}, timeout=0.5)
        assert time.monotonic() - started < 5
        await instance.destroy()
        assert instance.exited.done()

    run(scenario())


def test_exit_mid_call(driver_kind: str, make_spec: SpecFactory, world_dir: Path,
                       source: tuple[str, dict[str, str]]) -> None:
    runtime, files = source

    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(files, runtime=runtime)) as instance:
            with pytest.raises(RuntimeExited) as info:
                await call(instance, {"exit": True})
            assert type(info.value) is RuntimeExited
            assert "about to die" in instance.output.take()[0]

    run(scenario())


def test_destroy_is_idempotent_and_frees_everything(driver_kind: str, make_spec: SpecFactory,
                                                     world_dir: Path) -> None:
    async def scenario() -> None:
        driver = driver_for(driver_kind, world_dir)
        instance = await driver.create(make_spec({"handler.py": PY_OK}))
        marker = f"300.{uuid.uuid4().int % 10**9}"  # a unique argument to find the child by
        assert json.loads((await call(instance, {"spawn": marker})).body) == "spawned"
        vm = getattr(instance, "vm", None)  # a microVM's processes live in its guest
        assert vm is not None or processes_with(marker), "the background child should be running"
        await instance.destroy()
        await instance.destroy()
        assert instance.exited.done() and instance.destroyed
        assert not processes_with(marker), "destroy must kill every process of the instance"
        if vm is not None:
            assert vm.proc.poll() is not None, "destroy must stop the VM"
        with pytest.raises(Exception):  # noqa: B017 - any error, never a hang
            await asyncio.wait_for(call(instance, {}), 2)

    run(scenario())


def test_start_failure_is_named(driver_kind: str, make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        driver = driver_for(driver_kind, world_dir)
        spec: InstanceSpec = make_spec({"handler.py": PY_OK})
        if driver_kind == "microvm":  # the guest brings its own interpreters
            broken = replace(spec, runtime=replace(spec.runtime, id="cobol1", language="cobol"))
        else:
            broken = replace(spec, runtime=replace(spec.runtime, interpreter="/nonexistent/python3"))
        with pytest.raises((SandboxStartFailed, InitFailed)):
            await driver.create(broken)

    run(scenario())


def test_concurrent_instances_are_independent(driver_kind: str, make_spec: SpecFactory,
                                              world_dir: Path) -> None:
    async def scenario() -> None:
        driver = driver_for(driver_kind, world_dir)
        spec = make_spec({"handler.py": PY_OK})
        instances = await asyncio.gather(*(driver.create(replace(spec, instance_id=f"c{i}{spec.instance_id}"))
                                           for i in range(4)))
        try:
            replies = await asyncio.gather(*(call(i, {"k": n}) for n, i in enumerate(instances)))
            for n, reply in enumerate(replies):
                doc = json.loads(reply.body)
                assert doc["echo"] == {"k": n} and doc["count"] == 1
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))

    run(scenario())


# --- response streaming -------------------------------------------------------------------

# Each writes "first;", waits ``pause`` seconds, then writes "second;" and "last" (or fails);
# with ``http`` the body starts with the HTTP integration prelude.
STREAMING = {
    "nodejs20": {"index.js": """
exports.handler = awslambda.streamifyResponse(async (event, responseStream, context) => {
  let stream = responseStream;
  if (event.http) {
    stream = awslambda.HttpResponseStream.from(responseStream,
      {statusCode: 201, headers: {"x-impuls": "yes"}, cookies: ["a=1"]});
  } else {
    responseStream.setContentType("text/plain");
  }
  console.log("streaming", context.awsRequestId);
  stream.write("first;");
  await new Promise(r => setTimeout(r, (event.pause || 0) * 1000));
  if (event.fail) throw new TypeError("failed after the first chunk");
  stream.write(Buffer.from("second;"));
  stream.end("last");
});
"""},
    "python3.11": {"handler.py": """
import time

def handler(event, context):
    if event.get("http"):
        yield {"statusCode": 201, "headers": {"x-impuls": "yes"}, "cookies": ["a=1"]}
    print("streaming", context.aws_request_id)
    yield "first;"
    time.sleep(event.get("pause", 0))
    if event.get("fail"):
        raise TypeError("failed after the first chunk")
    yield b"second;"
    yield "last"
"""},
}
STREAM_CONTENT_TYPE = {"nodejs20": "text/plain", "python3.11": "application/octet-stream"}
PRELUDE = {"statusCode": 201, "headers": {"x-impuls": "yes"}, "cookies": ["a=1"]}


class RecordedStream(ResponseStream):
    """A ResponseStream that notes, for each piece as the Runtime API hands it on, whether the
    invocation had already ended then."""

    def __init__(self) -> None:
        super().__init__()
        self.invocation: Invocation | None = None
        self.pieces: list[tuple[bytes, bool]] = []

    def write(self, chunk: bytes) -> None:
        assert self.invocation is not None
        self.pieces.append((chunk, self.invocation.reply.done()))
        super().write(chunk)


def streamed(event: object, timeout: float = 10.0) -> tuple[Invocation, RecordedStream]:
    inv = invocation(event, timeout)
    stream = RecordedStream()
    inv.stream, stream.invocation = stream, inv
    return inv, stream


@pytest.mark.parametrize("runtime", list(STREAMING))
def test_a_streamed_response_arrives_while_the_handler_runs(
        driver_kind: str, make_spec: SpecFactory, world_dir: Path, runtime: str) -> None:
    """Node's streamifyResponse and Python's generators: the first chunk is handed on while the
    handler still runs (it waits 2 s before its next one): ordering, not speed."""

    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(STREAMING[runtime], runtime=runtime)) as inst:
            inv, stream = streamed({"pause": 2})
            pending = asyncio.create_task(inst.invoke(inv, 10.0))
            assert await stream.started() is True
            assert stream.content_type == STREAM_CONTENT_TYPE[runtime]
            assert await stream.read() == b"first;"
            assert not pending.done()
            rest = b"".join([piece async for piece in stream])
            reply = await pending
            assert reply == RuntimeReply(True, b"", streamed=True)
            assert rest == b"second;last" and stream.error_type is None
            first, ended = stream.pieces[0]
            assert first == b"first;" and not ended  # alone, and long before the end
            assert not any(ended for _, ended in stream.pieces)
            assert f"streaming {inv.request_id}" in inst.output.take()[0]  # output as ever
            # a caller that cannot stream gets the same response whole, from the same instance
            assert await call(inst, {}) == RuntimeReply(True, b"first;second;last")

    run(scenario())


@pytest.mark.parametrize("runtime", list(STREAMING))
def test_a_streamed_http_response_starts_with_its_prelude(
        driver_kind: str, make_spec: SpecFactory, world_dir: Path, runtime: str) -> None:
    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(STREAMING[runtime], runtime=runtime)) as inst:
            inv, stream = streamed({"http": True})
            pending = asyncio.create_task(inst.invoke(inv, 10.0))
            assert await stream.started() is True
            assert stream.content_type == HTTP_INTEGRATION_CONTENT_TYPE
            assert await stream.read_prelude() == PRELUDE
            assert b"".join([piece async for piece in stream]) == b"first;second;last"
            assert (await pending).streamed
            wire = b"".join(piece for piece, _ in stream.pieces)  # JSON, 8 NULs, the body
            metadata, _, body = wire.partition(b"\0" * 8)
            assert json.loads(metadata) == PRELUDE and body == b"first;second;last"

    run(scenario())


@pytest.mark.parametrize("runtime", list(STREAMING))
def test_an_error_after_the_first_chunk_ends_the_stream(
        driver_kind: str, make_spec: SpecFactory, world_dir: Path, runtime: str) -> None:
    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(STREAMING[runtime], runtime=runtime)) as inst:
            inv, stream = streamed({"fail": True})
            reply = await inst.invoke(inv, 10.0)
            assert reply.ok is False and reply.streamed and reply.error_type == "TypeError"
            doc = json.loads(reply.body)
            assert doc["errorType"] == "TypeError" and doc["errorMessage"] == "failed after the first chunk"
            assert doc["stackTrace"]
            assert await stream.started() is True
            assert b"".join([piece async for piece in stream]) == b"first;"
            assert (stream.error_type, stream.error_message) == ("TypeError", "failed after the first chunk")
            assert "failed after the first chunk" in inst.output.take()[0]
            again, stream = streamed({})  # the instance serves on
            assert (await inst.invoke(again, 10.0)).ok
            assert b"".join([piece async for piece in stream]) == b"first;second;last"

    run(scenario())


@pytest.mark.parametrize("runtime", list(STREAMING))
def test_a_timeout_mid_stream_keeps_what_was_streamed(
        driver_kind: str, make_spec: SpecFactory, world_dir: Path, runtime: str) -> None:
    async def scenario() -> None:
        driver = driver_for(driver_kind, world_dir)
        instance = await driver.create(make_spec(STREAMING[runtime], runtime=runtime))
        try:
            inv, stream = streamed({"pause": 30}, timeout=1.5)
            with pytest.raises(InvocationTimedOut):
                await instance.invoke(inv, 1.5)
            assert stream.pieces == [(b"first;", False)]  # the engine then closes the stream
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


@pytest.mark.parametrize("runtime", list(STREAMING))
def test_a_buffered_reply_to_a_caller_that_can_stream(
        driver_kind: str, make_spec: SpecFactory, world_dir: Path, runtime: str) -> None:
    async def scenario() -> None:
        async with running(driver_kind, world_dir, make_spec(SOURCES[runtime], runtime=runtime)) as inst:
            inv, stream = streamed({"n": 1})
            reply = await inst.invoke(inv, 10.0)
            assert reply.ok and not reply.streamed
            assert json.loads(reply.body)["echo"] == {"n": 1}
            assert stream.pieces == [] and stream.content_type == ""

    run(scenario())

