"""The native API's contract: ``/openapi.json`` against the server (Schemathesis) and
against docs/api.md.

Schemathesis runs every check it has except ``positive_data_acceptance``: a schema-valid
body may still break a rule the schema cannot state (an unknown runtime, a handler's form, a
name taken), so a 400 there is right.  It sends what the schema forbids (expects 4xx), checks
every answer's status, media type and body against the schema, never accepts a 5xx, and
follows the links it infers between operations (stateful).  A fixed seed keeps CI
repeatable; a longer run with fresh seeds is the command in docs/reliability.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import Server

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = Path(sys.executable).parent / "st"
#: a route in docs/api.md: `GET /path`, `GET|PUT /path`, or `PUT` or `PATCH /path`
DOC_ROUTE = re.compile(r"`(?:(GET|POST|PUT|PATCH|DELETE)` or `)?"
                       r"((?:GET|POST|PUT|PATCH|DELETE)\|?)+ (/[^`\s]*)")
METHODS = re.compile(r"GET|POST|PUT|PATCH|DELETE")


def schemathesis(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json",
         "--header", f"Authorization: Bearer {server.admin_key}",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--workers", "1",  # hypothesis' source inspection is not thread-safe on Python 3.11
         "--no-color", *args],
        capture_output=True, text=True, timeout=900, cwd=server.data_dir.parent)


def test_schemathesis_finds_no_fault(server: Server) -> None:
    run = schemathesis(server, "--max-examples", "25", "--seed", "20261130")
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-20000:]
    tested = re.search(r"Tested: (\d+)", report)
    assert tested and int(tested[1]) >= 40, report[-5000:]
    assert re.search(r"(\d+) generated, \1 passed", report), report[-5000:]
    # the run reached the core, not only the checks in front of it: the schema's example
    # function was created (and the fuzzer went on to change and delete things)
    audit = server.request("GET", "/api/v1/audit", params={"limit": 1000}).json()["entries"]
    assert ("function.create", "hello") in {(e["action"], e["target"]) for e in audit}


def _documented_routes() -> set[tuple[str, str]]:
    found = set()
    for match in DOC_ROUTE.finditer((ROOT / "docs" / "api.md").read_text()):
        path = re.sub(r"\[[^\]]*\]", "", match[3]).split("?")[0]
        methods = METHODS.findall(match[0].split(" /")[0])
        found |= {(method, path) for method in methods}
    return found


def test_docs_and_schema_name_the_same_routes(server: Server) -> None:
    schema = server.request("GET", "/openapi.json").json()
    described = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    documented = _documented_routes() - {("GET", "/openapi.json")}
    assert described - documented == set(), "routes missing from docs/api.md"
    assert documented - described == set(), "routes docs/api.md names that the server lacks"


def test_docs_list_every_error_status_the_schema_gives(server: Server) -> None:
    schema = server.request("GET", "/openapi.json").json()
    statuses = {int(status) for item in schema["paths"].values() for op in item.values()
                for status in op["responses"] if int(status) >= 400}
    table = (ROOT / "docs" / "api.md").read_text().split("## Authentication")[0]
    in_table = {int(s) for s in re.findall(r"^\| (\d{3}) \|", table, re.M)}
    assert statuses - in_table == set(), "statuses missing from the table at the top of docs/api.md"
