"""What every row invokes: the no-op handlers and the one event, identical for all rows."""

from __future__ import annotations

import json
from dataclasses import dataclass

EVENT: bytes = json.dumps({"name": "bench", "n": 1}, separators=(",", ":")).encode()

PYTHON_HANDLER = 'def handler(event, context):\n    return {"ok": True}\n'
NODE_HANDLER = "exports.handler = async (event, context) => ({ ok: true });\n"
GO_HANDLER = """package main

import "context"

func Handler(ctx context.Context, event map[string]interface{}) (interface{}, error) {
	return map[string]bool{"ok": true}, nil
}
"""
JAVA_HANDLER = """package bench;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestHandler;
import java.util.Map;

public class Handler implements RequestHandler<Map<String, Object>, Map<String, Boolean>> {
    @Override
    public Map<String, Boolean> handleRequest(Map<String, Object> event, Context context) {
        return Map.of("ok", true);
    }
}
"""
RUBY_HANDLER = "def handler(event:, context:)\n  { ok: true }\nend\n"
CSHARP_HANDLER = """using System.Collections.Generic;
using Amazon.Lambda.Core;

public class Function
{
    public Dictionary<string, bool> Handler(Dictionary<string, object> input, ILambdaContext context)
    {
        return new Dictionary<string, bool> { { "ok", true } };
    }
}
"""


@dataclass(frozen=True)
class Workload:
    runtime: str  # the Impuls runtime id
    label: str  # short name used in tables
    handler: str
    code: str


PYTHON = Workload("python3.11", "python", "handler.handler", PYTHON_HANDLER)
NODE = Workload("nodejs20", "node", "index.handler", NODE_HANDLER)
GO = Workload("go1.x", "go", "Handler", GO_HANDLER)  # compiled once at create
JAVA = Workload("java17", "java", "bench.Handler", JAVA_HANDLER)  # compiled once at create
RUBY = Workload("ruby3.1", "ruby", "function.handler", RUBY_HANDLER)
# compiled once at create
CSHARP = Workload("dotnet-mono", "csharp", "Function::Function::Handler", CSHARP_HANDLER)
WORKLOADS = (PYTHON, NODE, GO, JAVA, RUBY, CSHARP)
EXPECTED_BODY = {"ok": True}
