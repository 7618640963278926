"""Versions, aliases and reserved concurrency through a real server, on SQLite and PostgreSQL:
what a published version runs, how an alias splits calls, what is refused, what is audited,
and the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import Server, unique
from tests.test_auth import as_key, make_key
from tests.test_cli import impuls

CODE = ("import os\n"
        "def handler(event, context):\n"
        "    return {'code': CODE_VERSION, 'env': os.environ.get('V'),\n"
        "            'memory': context.memory_limit_in_mb, 'version': context.function_version,\n"
        "            'arn': context.invoked_function_arn}\n")


def code(n: int) -> str:
    return f"CODE_VERSION = {n}\n{CODE}"


def deploy(server: Server, **over: Any) -> str:
    fields: dict[str, Any] = {"runtime": "python3.11", "handler": "handler.handler", "code": code(1),
                              "environment": {"V": "1"}, **over}
    return str(server.deploy(**fields)["name"])


def publish(server: Server, name: str, **body: Any) -> dict[str, Any]:
    r = server.request("POST", f"/api/v1/functions/{name}/versions", json=body or None)
    assert r.status_code == 201, r.text
    return dict(r.json())


def update(server: Server, name: str, **body: Any) -> dict[str, Any]:
    r = server.request("PATCH", f"/api/v1/functions/{name}", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def two_versions(server: Server) -> str:
    """A function with version 1 (code 1, V=1), version 2 (code 2, V=2) and $LATEST (code 3, V=3)."""
    name = deploy(server)
    publish(server, name)
    update(server, name, code=code(2), environment={"V": "2"})
    publish(server, name)
    update(server, name, code=code(3), environment={"V": "3"})
    return name


def body(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status_code"] == 200, doc
    return dict(doc)


def test_publish_freezes_code_and_configuration(server: Server) -> None:
    name = deploy(server, memory_mb=256, description="first")
    v1 = publish(server, name)
    assert (v1["version"], v1["description"], v1["memory_mb"], v1["state"]) == ("1", "first", 256, "Active")
    assert "code" not in v1
    latest = update(server, name, code=code(2), environment={"V": "2"}, memory_mb=512)
    assert latest["version"] == "$LATEST" and latest["revision_id"] != v1["revision_id"]

    now = body(server.invoke(name))
    assert now["body"]["code"] == 2 and now["body"]["env"] == "2" and now["body"]["memory"] == 512
    assert now["executed_version"] == "$LATEST" and now["body"]["version"] == "$LATEST"
    old = body(server.invoke(name, qualifier="1"))
    assert (old["body"]["code"], old["body"]["env"], old["body"]["memory"]) == (1, "1", 256)
    assert old["executed_version"] == "1" and old["body"]["version"] == "1"
    assert old["body"]["arn"].endswith(f":function:{name}:1")
    in_path = body(server.client.post(f"/api/v1/functions/{name}:1/invoke", json={}))
    assert in_path["executed_version"] == "1" and in_path["body"]["code"] == 1

    got = server.request("GET", f"/api/v1/functions/{name}", params={"qualifier": "1"}).json()
    assert got["version"] == "1" and got["code"] == code(1) and got["environment"] == {"V": "1"}
    assert got["build"]["status"] in ("none", "success")
    listed = server.request("GET", f"/api/v1/functions/{name}/versions").json()["versions"]
    assert [v["version"] for v in listed] == ["$LATEST", "1"] and listed[1]["environment"] == ["V"]
    again = publish(server, name, description="second")
    assert again["version"] == "2" and again["description"] == "second"
    assert publish(server, name)["version"] == "2"  # nothing changed since: the same version


def test_lifecycle_fields_of_the_native_representation(server: Server) -> None:
    name = deploy(server)
    fn = server.request("GET", f"/api/v1/functions/{name}").json()
    assert (fn["version"], fn["state"], fn["last_update_status"], fn["role"], fn["tags"]) == (
        "$LATEST", "Active", "Successful", "", {})
    assert fn["reserved_concurrency"] is None and fn["state_reason"] is None and len(fn["revision_id"]) == 36
    listed = server.request("GET", "/api/v1/functions", params={"limit": 1000}).json()["functions"]
    assert next(f for f in listed if f["name"] == name)["state"] == "Active"
    r = server.request("PATCH", f"/api/v1/functions/{name}", json={"state": "Failed"})
    assert r.status_code == 400 and "read-only" in r.json()["message"]


def test_an_alias_splits_calls_by_weight(server: Server) -> None:
    name = two_versions(server)
    r = server.request("POST", f"/api/v1/functions/{name}/aliases",
                       json={"name": "live", "function_version": "1", "routing": {"2": 0.3}})
    assert r.status_code == 201, r.text
    assert r.json()["routing"] == {"2": 0.3} and r.json()["function_version"] == "1"
    calls = 400
    seen = Counter(body(server.invoke(f"{name}:live"))["executed_version"] for _ in range(calls))
    assert set(seen) <= {"1", "2"}
    # binomial(400, 0.3): mean 120, standard deviation 9.2; six of them either way
    spread = 6 * math.sqrt(calls * 0.3 * 0.7)
    assert abs(seen["2"] - calls * 0.3) < spread, seen
    for weight, expected in ((0.0, "1"), (1.0, "2")):
        r = server.request("PATCH", f"/api/v1/functions/{name}/aliases/live", json={"routing": {"2": weight}})
        assert r.status_code == 200 and r.json()["routing"] == {"2": weight}
        versions = {body(server.invoke(name, qualifier="live"))["executed_version"] for _ in range(50)}
        assert versions == {expected}
    code_of = body(server.invoke(name, qualifier="live"))["body"]
    assert code_of["code"] == 2 and code_of["arn"].endswith(f":{name}:live")


def test_alias_routes(server: Server) -> None:
    name = two_versions(server)
    base = f"/api/v1/functions/{name}/aliases"
    created = server.request("POST", base, json={"name": "prod", "function_version": "1",
                                                  "description": "stable"}).json()
    assert server.request("POST", base, json={"name": "prod", "function_version": "2"}).status_code == 409
    assert server.request("GET", f"{base}/prod").json() == created
    server.request("POST", base, json={"name": "edge", "function_version": "$LATEST"})
    assert [a["name"] for a in server.request("GET", base).json()["aliases"]] == ["edge", "prod"]
    assert [a["name"] for a in server.request("GET", base, params={"function_version": "1"})
            .json()["aliases"]] == ["prod"]
    stale = server.request("PATCH", f"{base}/prod", json={"function_version": "2",
                                                          "revision_id": "not-current"})
    assert stale.status_code == 412 and "revision_id" in stale.json()["message"]
    moved = server.request("PATCH", f"{base}/prod", json={"function_version": "2",
                                                          "revision_id": created["revision_id"]})
    assert moved.status_code == 200 and moved.json()["function_version"] == "2"
    assert moved.json()["description"] == "stable"
    assert body(server.invoke(name, qualifier="prod"))["executed_version"] == "2"
    assert body(server.invoke(name, qualifier="edge"))["executed_version"] == "$LATEST"
    got = server.request("GET", f"/api/v1/functions/{name}", params={"qualifier": "prod"}).json()
    assert got["version"] == "2"
    assert server.request("DELETE", f"{base}/prod").json()["alias"] == "prod"
    for status, method, path, payload in [
        (404, "GET", f"{base}/prod", None),
        (404, "POST", f"{base.replace(name, 'no-such-fn')}", {"name": "a", "function_version": "1"}),
        (404, "POST", base, {"name": "a", "function_version": "9"}),
        (400, "POST", base, {"name": "123", "function_version": "1"}),
        (400, "POST", base, {"name": "a", "function_version": 1}),
        (400, "POST", base, {"name": "a"}),
        (400, "POST", base, {"name": "a", "function_version": "1", "weights": {}}),
        (400, "POST", base, {"name": "a", "function_version": "1", "routing": {"2": 2}}),
        (400, "POST", base, {"name": "a", "function_version": "$LATEST", "routing": {"2": 0.5}}),
        (400, "PATCH", f"{base}/edge", {"routing": {"1": 0.5, "2": 0.1}}),
    ]:
        r = server.request(method, path, json=payload)
        assert r.status_code == status and r.json()["error"] is True, (path, payload, r.text)


def test_deleting_versions(server: Server) -> None:
    name = two_versions(server)
    server.request("POST", f"/api/v1/functions/{name}/aliases",
                   json={"name": "live", "function_version": "2", "routing": {"1": 0.5}})
    r = server.request("DELETE", f"/api/v1/functions/{name}", params={"qualifier": "1"})
    assert r.status_code == 409 and "'live'" in r.json()["message"]
    for qualifier in ("$LATEST", "live"):
        r = server.request("DELETE", f"/api/v1/functions/{name}", params={"qualifier": qualifier})
        assert r.status_code == 400 and "qualifier" in r.json()["message"]
    assert server.request("DELETE", f"/api/v1/functions/{name}/aliases/live").status_code == 200
    r = server.request("DELETE", f"/api/v1/functions/{name}", params={"qualifier": "1"})
    assert r.status_code == 200 and r.json() == {"message": "Version deleted successfully", "name": name,
                                                "version": "1"}
    assert server.invoke(name, qualifier="1").status_code == 404
    assert server.request("GET", f"/api/v1/functions/{name}", params={"qualifier": "1"}).status_code == 404
    assert body(server.invoke(name, qualifier="2"))["body"]["code"] == 2
    assert server.request("DELETE", f"/api/v1/functions/{name}").status_code == 200
    assert server.invoke(name, qualifier="2").status_code == 404


def test_invoke_qualifier_errors(server: Server) -> None:
    name = two_versions(server)
    assert server.invoke(name, qualifier="9").status_code == 404
    assert server.invoke(name, qualifier="nope").status_code == 404
    r = server.client.post(f"/api/v1/functions/{name}:1/invoke", params={"qualifier": "2"}, json={})
    assert r.status_code == 400 and "qualifier" in r.json()["message"]
    assert body(server.client.post(f"/api/v1/functions/{name}:2/invoke", params={"qualifier": "2"},
                                   json={}))["executed_version"] == "2"
    assert body(server.invoke(name, qualifier="$LATEST"))["executed_version"] == "$LATEST"


def test_reserved_concurrency_zero_throttles_every_version(server: Server) -> None:
    name = two_versions(server)
    r = server.request("PUT", f"/api/v1/functions/{name}/concurrency", json={"reserved_concurrency": 0})
    assert r.status_code == 200 and r.json()["reserved_concurrency"] == 0
    assert server.request("GET", f"/api/v1/functions/{name}").json()["reserved_concurrency"] == 0
    for qualifier in (None, "1", "2"):
        r = server.invoke(name, **({"qualifier": qualifier} if qualifier else {}))
        assert r.status_code == 429 and "reserved concurrency" in r.json()["message"]
    assert server.request("PUT", f"/api/v1/functions/{name}/concurrency",
                          json={"reserved_concurrency": -1}).status_code == 400
    assert server.request("DELETE", f"/api/v1/functions/{name}/concurrency").status_code == 200
    assert body(server.invoke(name, qualifier="1"))["executed_version"] == "1"


def test_new_actions_are_audited(server: Server) -> None:
    name = two_versions(server)
    base = f"/api/v1/functions/{name}"
    server.request("POST", f"{base}/aliases", json={"name": "live", "function_version": "1"})
    server.request("PATCH", f"{base}/aliases/live", json={"function_version": "2"})
    server.request("DELETE", f"{base}/aliases/live")
    server.request("DELETE", base, params={"qualifier": "1"})
    server.request("PUT", f"{base}/concurrency", json={"reserved_concurrency": 3})
    server.request("DELETE", f"{base}/concurrency")
    entries = server.request("GET", "/api/v1/audit", params={"limit": 100}).json()["entries"]
    mine = [(e["action"], e["target"], e["detail"]) for e in reversed(entries)
            if e["target"].split(":")[0] == name]
    assert [(a, t) for a, t, _ in mine] == [
        ("function.create", name), ("function.publish", name), ("function.update", name),
        ("function.publish", name), ("function.update", name), ("alias.create", f"{name}:live"),
        ("alias.update", f"{name}:live"), ("alias.delete", f"{name}:live"), ("version.delete", name),
        ("function.concurrency", name), ("function.concurrency", name)]
    assert mine[3][2]["version"] == 2 and mine[8][2] == {"version": 1}
    assert mine[9][2] == {"reserved_concurrency": 3} and mine[10][2] == {"reserved_concurrency": None}
    assert all(e["key_name"] == "IMPULS_ADMIN_KEY" for e in entries if e["target"].split(":")[0] == name)


def test_scopes_of_the_new_routes(server: Server) -> None:
    name = two_versions(server)
    server.request("POST", f"/api/v1/functions/{name}/aliases",
                   json={"name": "live", "function_version": "1"})
    reader, invoker = as_key(make_key(server, "read")["key"]), as_key(make_key(server, "invoke")["key"])
    base = f"/api/v1/functions/{name}"
    for path in (f"{base}/versions", f"{base}/aliases", f"{base}/aliases/live", f"{base}?qualifier=1"):
        assert server.client.get(path, headers=reader).status_code == 200, path
    for method, path, payload in [("POST", f"{base}/versions", None),
                                  ("POST", f"{base}/aliases", {"name": "x", "function_version": "1"}),
                                  ("PATCH", f"{base}/aliases/live", {"description": "x"}),
                                  ("DELETE", f"{base}/aliases/live", None),
                                  ("DELETE", f"{base}?qualifier=1", None),
                                  ("PUT", f"{base}/concurrency", {"reserved_concurrency": 1})]:
        assert server.client.request(method, path, json=payload, headers=invoker).status_code == 403, path
    assert server.client.post(f"{base}:live/invoke", json={}, headers=reader).status_code == 403
    r = server.client.post(f"{base}:live/invoke", json={}, headers=invoker)
    assert r.status_code == 200 and r.json()["executed_version"] == "1"


def test_versions_and_aliases_survive_a_restart(make_server: Callable[..., Server],
                                                store_env: dict[str, str]) -> None:
    first = make_server(env=store_env)
    name = two_versions(first)
    first.request("POST", f"/api/v1/functions/{name}/aliases", json={"name": "live", "function_version": "1"})
    first.stop()
    second = make_server(env=store_env, data_dir=first.data_dir)
    assert body(second.invoke(name, qualifier="live"))["body"]["code"] == 1
    assert body(second.invoke(name, qualifier="2"))["body"]["code"] == 2
    assert body(second.invoke(name))["body"]["code"] == 3


def test_cli_publish_alias_and_qualified_invoke(server: Server) -> None:
    name = deploy(server)
    out = impuls(server, "publish", name, "--description", "from the cli")
    assert out.returncode == 0 and "version 1" in out.stdout, out.stderr
    update(server, name, code=code(2))
    assert json.loads(impuls(server, "publish", name, "--json").stdout)["version"] == "2"
    out = impuls(server, "alias", "create", name, "live", "--version", "1", "--routing", "2=0.0")
    assert out.returncode == 0 and "version 1" in out.stdout, out.stderr
    out = impuls(server, "alias", "ls", name)
    assert out.returncode == 0 and "live" in out.stdout and "2=0" in out.stdout
    out = impuls(server, "invoke", name, "--qualifier", "live", "-v")
    assert out.returncode == 0 and json.loads(out.stdout)["code"] == 1 and "version 1" in out.stderr
    out = impuls(server, "alias", "update", name, "live", "--version", "2", "--no-routing")
    assert out.returncode == 0, out.stderr
    assert json.loads(impuls(server, "invoke", name, "--qualifier", "live").stdout)["code"] == 2
    assert json.loads(impuls(server, "get", name, "--qualifier", "1", "--json").stdout)["version"] == "1"
    assert "from the cli" in impuls(server, "versions", name).stdout
    bad = impuls(server, "alias", "update", name, "live", "--routing", "2")
    assert bad.returncode == 1 and "VERSION=WEIGHT" in bad.stderr
    out = impuls(server, "rm", name, "--version", "1")
    assert out.returncode == 0 and "version 1" in out.stdout
    assert impuls(server, "alias", "rm", name, "live").returncode == 0
    assert json.loads(impuls(server, "alias", "ls", name, "--json").stdout) == []


@pytest.mark.parametrize("payload", [{"description": "d" * 257}, {"bogus": 1}, [1]])
def test_publish_body_is_checked(server: Server, payload: Any) -> None:
    name = deploy(server)
    r = server.request("POST", f"/api/v1/functions/{name}/versions", json=payload)
    assert r.status_code == 400 and r.json()["error"] is True
    assert server.request("POST", f"/api/v1/functions/{unique()}/versions").status_code == 404
