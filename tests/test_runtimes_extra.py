"""Go, Java, custom (``provided``), Ruby and C# (Mono) runtimes, awslambdaric, and dependency
packages, through the HTTP API."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from impuls.runtimes import build_steps
from tests.helpers import Server, make_zip

GO_OK = """package main

import (
	"context"
	"errors"
	"fmt"
)

type quotaError struct{ left int }

func (e *quotaError) Error() string { return fmt.Sprintf("quota exceeded, %d left", e.left) }

func Handler(ctx context.Context, event map[string]interface{}) (interface{}, error) {
	fmt.Println("go handling", event["name"])
	switch {
	case event["fail"] != nil:
		return nil, errors.New("failed on purpose")
	case event["quota"] != nil:
		return nil, &quotaError{left: 0}
	case event["panic"] != nil:
		panic("boom")
	}
	_, hasDeadline := ctx.Deadline()
	return map[string]interface{}{"hello": event["name"], "deadline": hasDeadline}, nil
}
"""

PY_BOOTSTRAP = """#!/usr/bin/python3
# A custom runtime written for this test: the Runtime API by hand, with urllib.
import json, os, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
print("custom runtime up, handler", os.environ["_HANDLER"], flush=True)
while True:
    with urllib.request.urlopen(api + "next") as resp:
        rid = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        event = json.loads(resp.read())
    if event.get("fail"):
        url, body = api + rid + "/error", {"errorType": "CustomError", "errorMessage": "custom failure"}
    else:
        url, body = api + rid + "/response", {"custom": event, "handler": os.environ["_HANDLER"]}
    print("answered", rid, flush=True)
    urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode(), method="POST"))
"""

APP = """
def handler(event, context):
    if event.get("fail"):
        raise ValueError("bad input: " + str(event["fail"]))
    return {"event": event, "function_name": context.function_name,
            "memory": int(context.memory_limit_in_mb), "version": context.function_version,
            "arn": context.invoked_function_arn, "log_group": context.log_group_name,
            "has_remaining": context.get_remaining_time_in_millis() > 0,
            "request_id_matches": bool(context.aws_request_id)}
"""


@pytest.fixture(scope="module", params=["process", "namespace"])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if request.param == "namespace":
        from impuls.sandbox import namespace

        if reason := namespace.available():
            pytest.skip(f"the namespace sandbox is unavailable here: {reason}")
    server = Server(tmp_path_factory.mktemp("runtimes") / "data", args=["--sandbox", request.param]).start()
    yield server
    server.stop()


def package_meta(server: Server, name: str) -> float:
    """mtime of the function's build record: unchanged when nothing was rebuilt."""
    fn = server.request("GET", f"/api/v1/functions/{name}").json()
    metas = sorted((server.data_dir / "packages").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert metas and fn["build"]["status"] in ("success", "none")
    return max(p.stat().st_mtime for p in metas)


def test_go_success_errors_panic_and_cache(srv: Server) -> None:
    fn = srv.deploy(runtime="go", handler="Handler", code=GO_OK)
    assert fn["runtime"] == "go1.x" and fn["build"]["status"] == "success"
    name = fn["name"]
    doc = srv.invoke(name, {"name": "gopher"}).json()
    assert doc["status_code"] == 200 and doc["body"] == {"hello": "gopher", "deadline": True}
    assert "go handling gopher" in doc["logs"]
    doc = srv.invoke(name, {"fail": True}).json()
    assert (doc["status_code"], doc["error"], doc["error_type"]) == (500, "failed on purpose", "errorString")
    doc = srv.invoke(name, {"quota": True}).json()
    assert doc["error_type"] == "quotaError" and doc["error"] == "quota exceeded, 0 left"
    doc = srv.invoke(name, {"panic": True}).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.Panic" and doc["error"] == "boom"
    assert srv.invoke(name, {"name": "again"}).json()["cold_start"] is False  # survived the panic

    before = package_meta(srv, name)
    again = srv.deploy(runtime="go1.x", handler="Handler", code=GO_OK)  # same code: no rebuild
    assert again["build"] == fn["build"] and package_meta(srv, again["name"]) == before


def test_go_compile_error_keeps_old_version(srv: Server) -> None:
    name = srv.deploy(runtime="go", handler="Handler", code=GO_OK)["name"]
    broken = GO_OK.replace("func Handler(", "func Handler( {")
    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"code": broken})
    assert r.status_code == 400
    assert "build failed" in r.json()["message"] and "syntax error" in r.json()["message"]
    assert srv.invoke(name, {"name": "still"}).json()["body"]["hello"] == "still"
    r = srv.create(name="go-bad-create", runtime="go", handler="Handler", code=broken)
    assert r.status_code == 400 and "syntax error" in r.json()["message"]
    r = srv.create(name="go-bad-handler", runtime="go", handler="handler.Handler", code=GO_OK)
    assert r.status_code == 400 and "exported Go function" in r.json()["message"]


def test_provided_with_own_bootstrap(srv: Server) -> None:
    archive = make_zip({"bootstrap": PY_BOOTSTRAP, "data.txt": "x"})
    fn = srv.deploy(runtime="provided", handler="my.handler", code_zip=archive)
    doc = srv.invoke(fn["name"], {"a": 1}).json()
    assert doc["status_code"] == 200, doc
    assert doc["body"] == {"custom": {"a": 1}, "handler": "my.handler"}
    assert "custom runtime up" in doc["logs"] and "answered" in doc["logs"]
    doc = srv.invoke(fn["name"], {"fail": 1}).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "CustomError"
    r = srv.create(name="no-bootstrap", runtime="provided", handler="x",
                   code_zip=make_zip({"main.sh": "echo"}))
    assert r.status_code == 400 and "bootstrap" in r.json()["message"]


RAW_BOOTSTRAP = """#!/usr/bin/python3
# Answers each event with the bytes it names (hex), whatever they are.
import json, os, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
while True:
    with urllib.request.urlopen(api + "next") as resp:
        rid = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        raw = bytes.fromhex(json.loads(resp.read())["hex"])
    urllib.request.urlopen(urllib.request.Request(api + rid + "/response", data=raw, method="POST"))
"""


def test_the_reply_carries_the_runtimes_json_and_never_more(srv: Server) -> None:
    """A response that is one JSON value is the reply's body as it is; anything else (text,
    bytes that are not UTF-8, a value with more JSON after it) is a string, so a function
    cannot add fields to the reply."""
    fn = srv.deploy(runtime="provided", handler="raw", code_zip=make_zip({"bootstrap": RAW_BOOTSTRAP}))
    cases: list[tuple[bytes, object]] = [
        (b'{"a": [1, 2.50, "\\u00e9"], "b": null}', {"a": [1, 2.5, "\u00e9"], "b": None}),
        (b' [1, 2]\n', [1, 2]),
        ("\"caf\u00e9\"".encode(), "caf\u00e9"),
        (b"", None),
        (b"plain words", "plain words"),
        (b'1, "status_code": 500, "error_type": "Forged"', '1, "status_code": 500, "error_type": "Forged"'),
        (b'{"a": 1}} ', '{"a": 1}} '),
        (b"\xff\xfe{}", "\ufffd\ufffd{}"),
    ]
    for raw, body in cases:
        r = srv.invoke(fn["name"], {"hex": raw.hex()})
        doc = r.json()
        assert r.status_code == 200 and doc["status_code"] == 200 and doc["body"] == body, (raw, doc)
        assert "error_type" not in doc and set(doc) == {"status_code", "body", "duration_ms", "logs",
                                                        "request_id", "cold_start", "executed_version"}


@pytest.fixture(scope="module")
def ric_package(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A package with the official awslambdaric from PyPI, started by a bootstrap script."""
    root = tmp_path_factory.mktemp("ric")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
                          "--disable-pip-version-check", "--target", str(root), "awslambdaric==4.2.2"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert pip.returncode == 0, pip.stderr
    (root / "app.py").write_text(APP)
    (root / "bootstrap").write_text(
        '#!/bin/sh\nexport PYTHONPATH="$LAMBDA_TASK_ROOT"\n'
        'exec /usr/bin/python3 -m awslambdaric "$_HANDLER"\n')
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                info = zipfile.ZipInfo(path.relative_to(root).as_posix())
                info.external_attr = (os.stat(path).st_mode & 0o777 | 0o100000) << 16
                zf.writestr(info, path.read_bytes())
    return base64.b64encode(buf.getvalue()).decode()


def test_awslambdaric_matches_builtin_python(srv: Server, ric_package: str) -> None:
    ric = srv.deploy(runtime="provided", handler="app.handler", code_zip=ric_package, memory_mb=256)
    own = srv.deploy(runtime="python3.11", handler="app.handler", code_zip=make_zip({"app.py": APP}),
                     memory_mb=256)

    def normalise(doc: dict[str, Any], name: str) -> dict[str, Any]:
        body = dict(doc["body"])
        assert body.pop("function_name") == name and body.pop("arn").endswith(f":function:{name}")
        assert body.pop("log_group") == f"/aws/lambda/{name}"
        return body

    a = srv.invoke(ric["name"], {"k": [1, 2]}).json()
    b = srv.invoke(own["name"], {"k": [1, 2]}).json()
    assert a["status_code"] == b["status_code"] == 200, (a, b)
    assert normalise(a, ric["name"]) == normalise(b, own["name"])
    ea = srv.invoke(ric["name"], {"fail": 7}).json()
    eb = srv.invoke(own["name"], {"fail": 7}).json()
    for doc in (ea, eb):
        assert doc["status_code"] == 500 and doc["error_type"] == "ValueError"
        assert doc["error"] == "bad input: 7" and doc["stack"]


def test_python_requirements_installed_once(srv: Server) -> None:
    code = "import six\ndef handler(e, c):\n    return {'six': six.__version__}\n"
    archive = make_zip({"handler.py": code, "requirements.txt": "six==1.16.0\n"})
    fn = srv.deploy(runtime="python3.11", handler="handler.handler", code_zip=archive)
    assert fn["build"]["status"] == "success" and "six" in fn["build"]["log"]
    assert srv.invoke(fn["name"]).json()["body"] == {"six": "1.16.0"}
    before = package_meta(srv, fn["name"])
    again = srv.deploy(runtime="python3.11", handler="handler.handler", code_zip=archive)
    assert again["build"] == fn["build"] and package_meta(srv, again["name"]) == before


def test_node_dependencies(srv: Server) -> None:
    archive = make_zip({
        "index.js": "const isNumber = require('is-number');\n"
                    "exports.handler = async (e) => ({ isNumber: isNumber(e.v) });\n",
        "package.json": '{"name": "fn", "version": "1.0.0", "dependencies": {"is-number": "7.0.0"},'
                        ' "devDependencies": {"left-pad": "1.3.0"}}',
    })
    fn = srv.deploy(runtime="nodejs20", handler="index.handler", code_zip=archive)
    assert fn["build"]["status"] == "success"
    assert srv.invoke(fn["name"], {"v": 5}).json()["body"] == {"isNumber": True}
    packages = list((srv.data_dir / "packages").glob("*/node_modules/left-pad"))
    assert not packages, "devDependencies are not installed"


def test_failing_dependency_build(srv: Server) -> None:
    name = srv.deploy(runtime="python3.11", handler="handler.handler",
                      code="def handler(e, c):\n    return 'old'\n")["name"]
    bad = make_zip({"handler.py": "def handler(e, c):\n    return 'new'\n",
                    "requirements.txt": "impuls-no-such-package-anywhere==9.9.9\n"})
    r = srv.request("PUT", f"/api/v1/functions/{name}", json={"code_zip": bad})
    assert r.status_code == 400
    message = r.json()["message"]
    assert "pip install failed" in message and "impuls-no-such-package-anywhere" in message
    assert srv.invoke(name).json()["body"] == "old"



# --- Java 17 -------------------------------------------------------------------------------

JAVA_HELLO = """package example;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestHandler;
import java.util.Map;

public class Hello implements RequestHandler<Hello.Order, Hello.Receipt> {
    public static class Order {
        public String item;
        public int quantity;
        public String fail;
        public boolean unmarshalable;
    }

    public static class Receipt {
        public String line;
        public Map<String, Object> context;
        public Object extra;
    }

    @Override
    public Receipt handleRequest(Order order, Context context) {
        context.getLogger().log("java handling " + order.item + "\\n");
        if (order.fail != null) throw new IllegalStateException("failed on purpose: " + order.fail);
        Receipt receipt = new Receipt();
        receipt.line = order.quantity + " x " + order.item;
        receipt.context = Map.of("function", context.getFunctionName(),
            "version", context.getFunctionVersion(), "memory", context.getMemoryLimitInMB(),
            "arn", context.getInvokedFunctionArn(),
            "group", context.getLogGroupName(), "stream", context.getLogStreamName(),
            "remaining", context.getRemainingTimeInMillis() > 0, "request", context.getAwsRequestId());
        if (order.unmarshalable) receipt.extra = new Object();  // Jackson cannot write an empty bean
        return receipt;
    }
}
"""


def test_java_sources_success_errors_and_cache(srv: Server) -> None:
    fn = srv.deploy(runtime="java17", handler="example.Hello", code=JAVA_HELLO, memory_mb=128)
    assert fn["runtime"] == "java17" and fn["build"]["status"] == "success" and "javac" in fn["build"]["log"]
    name = fn["name"]
    doc = srv.invoke(name, {"item": "tea", "quantity": 2, "ignored": True}).json()
    assert doc["status_code"] == 200, doc
    body = doc["body"]
    assert body["line"] == "2 x tea" and body["extra"] is None
    context = body["context"]
    assert (context["function"], context["version"], context["memory"]) == (name, "$LATEST", 128)
    assert context["arn"].endswith(f":function:{name}") and context["group"] == f"/aws/lambda/{name}"
    assert context["stream"] and context["remaining"] is True and context["request"] == doc["request_id"]
    assert "java handling tea" in doc["logs"]
    doc = srv.invoke(name, {"item": "x", "fail": "now"}).json()
    assert (doc["status_code"], doc["error_type"]) == (500, "java.lang.IllegalStateException"), doc
    assert doc["error"] == "failed on purpose: now" and "example.Hello.handleRequest" in doc["stack"][0]
    doc = srv.invoke(name, {"item": "x", "unmarshalable": True}).json()
    assert (doc["status_code"], doc["error_type"]) == (500, "Runtime.MarshalError"), doc
    doc = srv.invoke(name, {"quantity": "many"}).json()
    assert (doc["status_code"], doc["error_type"]) == (500, "Runtime.UnmarshalError"), doc
    doc = srv.invoke(name, {"item": "again", "quantity": 1}).json()
    assert doc["body"]["line"] == "1 x again" and doc["cold_start"] is False  # the instance served on

    before = package_meta(srv, name)
    again = srv.deploy(runtime="java", handler="example.Hello", code=JAVA_HELLO)  # same code: no rebuild
    assert again["build"] == fn["build"] and package_meta(srv, again["name"]) == before


def test_java_compile_and_init_errors(srv: Server) -> None:
    name = srv.deploy(runtime="java17", handler="example.Hello", code=JAVA_HELLO)["name"]
    broken = JAVA_HELLO.replace("int quantity;", "int")
    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"code": broken})
    assert r.status_code == 400
    assert "javac failed" in r.json()["message"] and "Hello.java" in r.json()["message"]
    assert srv.invoke(name, {"item": "kept", "quantity": 1}).json()["body"]["line"] == "1 x kept"
    r = srv.create(name="java-bad-handler", runtime="java17", handler="example/Hello.handle", code=JAVA_HELLO)
    assert r.status_code == 400 and "package.Class::method" in r.json()["message"]
    package = make_zip({"example/Hello.java": JAVA_HELLO})
    for handler, error_type in [("example.Nope::handleRequest", "Runtime.ImportModuleError"),
                                ("example.Hello::nope", "Runtime.HandlerNotFound")]:
        wrong = srv.deploy(runtime="java17", handler=handler, code_zip=package)
        doc = srv.invoke(wrong["name"], {}).json()
        assert (doc["status_code"], doc["error_type"]) == (500, error_type), doc
        assert doc["logs"], "the runtime's output is returned"


def _javac(sources: dict[str, str], classpath: list[Path], out: Path) -> None:
    src = out.parent / f"{out.name}-src"
    for rel, text in sources.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    done = subprocess.run([str(build_steps.JAVA_HOME / "bin" / "javac"), "--release", "17", "-d", str(out),
                           "-cp", ":".join(map(str, classpath)), *map(str, src.rglob("*.java"))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr


def _jar(classes: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(classes.rglob("*.class")):
            zf.write(path, path.relative_to(classes).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


GREETER = """package greeting;

public class Greeter {
    public static String greet(String who) { return "hello " + who; }
}
"""
STREAM_HANDLER = """package example;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestStreamHandler;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.InputStream;
import java.io.OutputStream;
import java.util.Map;

public class Upper implements RequestStreamHandler {
    public void handleRequest(InputStream in, OutputStream out, Context context) throws java.io.IOException {
        Map<?, ?> event = new ObjectMapper().readValue(in, Map.class);
        out.write(new ObjectMapper().writeValueAsBytes(Map.of("greeting",
            greeting.Greeter.greet(String.valueOf(event.get("who"))).toUpperCase())));
    }
}
"""
STATIC_HANDLER = """package example;

public class Static {
    public static String greet(String who) { return greeting.Greeter.greet(who); }
}
"""


def test_java_jar_and_lib_dependency(srv: Server, tmp_path: Path) -> None:
    """Lambda's package forms: a jar of classes (the handler a RequestStreamHandler, its dependency
    in lib/), and sources compiled at deploy against a jar in lib/ (a static Class::method)."""
    _javac({"greeting/Greeter.java": GREETER}, [], tmp_path / "lib")
    lib = _jar(tmp_path / "lib")
    api = [build_steps.java_client_jar(tmp_path / "cache"), *map(Path, build_steps.JACKSON_JARS)]
    _javac({"example/Upper.java": STREAM_HANDLER}, [*api, tmp_path / "lib"], tmp_path / "app")
    jar = _jar(tmp_path / "app", {"lib/greeting.jar": lib})
    fn = srv.deploy(runtime="java17", handler="example.Upper", code_zip=base64.b64encode(jar).decode())
    doc = srv.invoke(fn["name"], {"who": "jar"}).json()
    assert doc["status_code"] == 200 and doc["body"] == {"greeting": "HELLO JAR"}, doc
    fn = srv.deploy(runtime="java17", handler="example.Static::greet",
                    code_zip=make_zip({"src/main/java/example/Static.java": STATIC_HANDLER,
                                       "lib/greeting.jar": lib}))
    assert fn["build"]["status"] == "success"
    doc = srv.invoke(fn["name"], "sources").json()
    assert doc["status_code"] == 200 and doc["body"] == "hello sources", doc


RUBY_APP = """
require "json"

def handler(event:, context:)
  puts "ruby handling #{event["name"]}"
  raise ArgumentError, "bad input: #{event["fail"]}" if event["fail"]
  return Float::NAN if event["nan"]
  { hello: event["name"], function_name: context.function_name, version: context.function_version,
    memory: context.memory_limit_in_mb, arn: context.invoked_function_arn,
    log_group: context.log_group_name, log_stream: !context.log_stream_name.empty?,
    remaining: context.get_remaining_time_in_millis.between?(1, 30_000),
    request_id: context.aws_request_id }
end
"""


def test_ruby_success_error_and_context(srv: Server) -> None:
    fn = srv.deploy(runtime="ruby", handler="function.handler", code=RUBY_APP, memory_mb=256, timeout_sec=30)
    name = fn["name"]
    assert fn["runtime"] == "ruby3.1"
    doc = srv.invoke(name, {"name": "rubyist"}).json()
    assert doc["status_code"] == 200, doc
    body = doc["body"]
    assert body.pop("request_id") == doc["request_id"]
    assert body == {"hello": "rubyist", "function_name": name, "version": "$LATEST", "memory": "256",
                    "arn": body["arn"], "log_group": f"/aws/lambda/{name}", "log_stream": True,
                    "remaining": True}
    assert body["arn"].endswith(f":function:{name}") and "ruby handling rubyist" in doc["logs"]
    doc = srv.invoke(name, {"fail": 7}).json()
    assert (doc["status_code"], doc["error_type"], doc["error"]) == (500, "ArgumentError", "bad input: 7")
    assert any("function.rb" in line for line in doc["stack"])
    doc = srv.invoke(name, {"nan": True}).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.MarshalError", doc
    again = srv.invoke(name, {"name": "wörld ✓"}).json()
    assert again["cold_start"] is False and again["body"]["hello"] == "wörld ✓"  # serves on, in UTF-8


def test_ruby_init_errors_and_handler_form(srv: Server) -> None:
    doc = srv.invoke(srv.deploy(runtime="ruby3.1", handler="function.handler",
                                code="def handler(event:, context:\n")["name"]).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.UserCodeSyntaxError", doc
    doc = srv.invoke(srv.deploy(runtime="ruby3.1", handler="function.handler",
                                code="X = 1\n")["name"]).json()
    assert doc["error_type"] == "Runtime.HandlerNotFound", doc
    r = srv.create(name="ruby-bad-handler", runtime="ruby3.1", handler="function", code="X = 1\n")
    assert r.status_code == 400 and "file.method" in r.json()["message"]
    r = srv.create(name="ruby-no-file", runtime="ruby3.1", handler="app.handler",
                   code_zip=make_zip({"function.rb": "X = 1\n"}))
    assert r.status_code == 400 and "app.rb" in r.json()["message"]


def test_ruby_multi_file_package_and_vendored_gem(srv: Server) -> None:
    """``require_relative`` across the package, a class-level handler in a sub-folder, and a gem
    vendored under vendor/bundle (as ``bundle install --path vendor/bundle`` leaves it)."""
    archive = make_zip({
        "lib/app.rb": 'require_relative "greeting"\nrequire "tiny_gem"\n'
                      "module Shop\n  class Orders\n    def self.process(event:, context:)\n"
                      '      { text: Greeting.for(event["who"]), gem: TinyGem::VERSION }\n'
                      "    end\n  end\nend\n",
        "lib/greeting.rb": 'module Greeting\n  def self.for(who) = "hello, #{who}"\nend\n',
        "vendor/bundle/ruby/3.1.0/gems/tiny_gem-0.1.0/lib/tiny_gem.rb":
            'module TinyGem\n  VERSION = "0.1.0"\nend\n',
        "Gemfile": 'source "https://rubygems.org"\ngem "tiny_gem"\n',
    })
    fn = srv.deploy(runtime="ruby", handler="lib/app.Shop::Orders.process", code_zip=archive)
    doc = srv.invoke(fn["name"], {"who": "world"}).json()
    assert doc["status_code"] == 200, doc
    assert doc["body"] == {"text": "hello, world", "gem": "0.1.0"}
    before = package_meta(srv, fn["name"])
    again = srv.deploy(runtime="ruby", handler="lib/app.Shop::Orders.process", code_zip=archive)
    assert package_meta(srv, again["name"]) == before  # the same package, not unpacked again


CSHARP_APP = """
using System;
using System.IO;
using System.Text;
using Amazon.Lambda.Core;

[assembly: LambdaSerializer(typeof(Amazon.Lambda.Serialization.SystemTextJson.DefaultLambdaJsonSerializer))]

namespace Example
{
    public class Order
    {
        public string Name { get; set; }
        public int Fail { get; set; }
        public bool Loop { get; set; }
    }

    public class Node { public Node Next { get; set; } }

    public class Function
    {
        public object Handler(Order order, ILambdaContext context)
        {
            context.Logger.LogLine("csharp handling " + order.Name);
            if (order.Fail > 0) throw new InvalidOperationException("bad input: " + order.Fail);
            if (order.Loop) { var node = new Node(); node.Next = node; return node; }
            return new {
                Hello = order.Name, context.FunctionName, context.FunctionVersion, context.MemoryLimitInMB,
                context.InvokedFunctionArn, context.LogGroupName, LogStream = context.LogStreamName != "",
                Remaining = context.RemainingTime > TimeSpan.Zero && context.RemainingTime.TotalSeconds <= 30,
                context.AwsRequestId };
        }

        public static Stream Raw(Stream input)
        {
            var text = new StreamReader(input).ReadToEnd();
            return new MemoryStream(Encoding.UTF8.GetBytes("[" + text + "," + text + "]"));
        }
    }
}
"""


def test_csharp_success_error_and_context(srv: Server) -> None:
    fn = srv.deploy(runtime="dotnet-mono", handler="Function::Example.Function::Handler",
                    code=CSHARP_APP, memory_mb=256, timeout_sec=30)
    name = fn["name"]
    assert fn["build"]["status"] == "success" and "mcs" in fn["build"]["log"]
    doc = srv.invoke(name, {"name": "sharp"}).json()
    assert doc["status_code"] == 200, doc
    body = doc["body"]
    assert body.pop("AwsRequestId") == doc["request_id"]
    assert body == {"Hello": "sharp", "FunctionName": name, "FunctionVersion": "$LATEST",
                    "MemoryLimitInMB": 256, "InvokedFunctionArn": body["InvokedFunctionArn"],
                    "LogGroupName": f"/aws/lambda/{name}", "LogStream": True, "Remaining": True}
    assert body["InvokedFunctionArn"].endswith(f":function:{name}") and "csharp handling sharp" in doc["logs"]
    doc = srv.invoke(name, {"name": "x", "fail": 7}).json()
    assert (doc["status_code"], doc["error_type"]) == (500, "InvalidOperationException")
    assert doc["error"] == "bad input: 7"
    assert doc["stack"][0].startswith("at Example.Function.Handler"), doc["stack"]
    doc = srv.invoke(name, {"loop": True}).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.MarshalError", doc
    doc = srv.invoke(name, "not an order").json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.UnmarshalError", doc
    again = srv.invoke(name, {"name": "wörld ✓"}).json()
    assert again["cold_start"] is False and again["body"]["Hello"] == "wörld ✓"  # serves on, in UTF-8

    raw = srv.deploy(runtime="dotnet-mono", handler="Function::Example.Function::Raw", code=CSHARP_APP)
    assert srv.invoke(raw["name"], {"a": 1}).json()["body"] == [{"a": 1}, {"a": 1}]


def test_csharp_build_and_init_errors(srv: Server) -> None:
    name = srv.deploy(runtime="dotnet-mono", handler="Function::Example.Function::Raw",
                      code=CSHARP_APP)["name"]
    broken = CSHARP_APP.replace("public class Node {", "public class Node {{")
    r = srv.request("PATCH", f"/api/v1/functions/{name}", json={"code": broken})
    assert r.status_code == 400
    assert "mcs failed" in r.json()["message"] and "error CS" in r.json()["message"]
    assert srv.invoke(name, {"still": 1}).json()["body"] == [{"still": 1}, {"still": 1}]
    doc = srv.invoke(srv.deploy(runtime="dotnet-mono", handler="Function::Example.Missing::Handler",
                                code=CSHARP_APP)["name"]).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.HandlerNotFound", doc
    r = srv.create(name="cs-bad-handler", runtime="dotnet-mono", handler="Example.Function.Handler",
                   code=CSHARP_APP)
    assert r.status_code == 400 and "Assembly::Namespace.Class::Method" in r.json()["message"]


def test_csharp_multi_file_package_with_a_dll(srv: Server, tmp_path: Any) -> None:
    """Sources in sub-folders compiled into one assembly, an async handler, and a library built
    elsewhere shipped as a .dll at the package root."""
    (tmp_path / "Greeter.cs").write_text(
        "namespace Lib { public static class Greeter {\n"
        '  public static string For(string who) { return "hello, " + who; } } }\n')
    mcs = subprocess.run(["mcs", "-target:library", "-out:Greeter.dll", "Greeter.cs"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert mcs.returncode == 0, mcs.stdout + mcs.stderr
    archive = make_zip({
        "src/Models/Request.cs": "namespace Shop.Models {\n"
                                 "  public class Request { public string Who { get; set; } }\n"
                                 "  public class Reply { public string Text { get; set; } } }\n",
        "src/Orders.cs": "using System.Threading.Tasks;\nusing Amazon.Lambda.Core;\nusing Shop.Models;\n"
                         "namespace Shop { public class Orders {\n"
                         "  public async Task<Reply> Process(Request request, ILambdaContext context) {\n"
                         "    await Task.Delay(1);\n"
                         "    return new Reply { Text = Lib.Greeter.For(request.Who) }; } } }\n",
        "Greeter.dll": (tmp_path / "Greeter.dll").read_bytes(),
    })
    fn = srv.deploy(runtime="dotnet-mono", handler="ShopFunctions::Shop.Orders::Process", code_zip=archive)
    doc = srv.invoke(fn["name"], {"Who": "world"}).json()
    assert doc["status_code"] == 200, doc
    assert doc["body"] == {"Text": "hello, world"}
    before = package_meta(srv, fn["name"])
    again = srv.deploy(runtime="dotnet-mono", handler="ShopFunctions::Shop.Orders::Process",
                       code_zip=archive)
    assert again["build"] == fn["build"] and package_meta(srv, again["name"]) == before  # not rebuilt
