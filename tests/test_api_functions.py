"""The function REST API through a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from tests.helpers import Server, make_zip, unique

PY = "def handler(event, context):\n    return {'ok': True}\n"


def body(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": unique(), "runtime": "python3.11",
                            "handler": "handler.handler", "code": PY}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_health(server: Server) -> None:
    r = server.request("GET", "/health")
    assert r.status_code == 200
    data = r.json()
    assert data["status"] == "healthy" and data["service"] == "impuls" and data["version"]


def test_create_get_roundtrip(server: Server) -> None:
    b = body(description="hi", environment={"A": "1"}, memory_mb=256, timeout_sec=5)
    r = server.create(**b)
    assert r.status_code == 201, r.text
    fn = r.json()
    assert fn["name"] == b["name"] and fn["runtime"] == "python3.11"
    assert fn["code"] == PY and fn["memory_mb"] == 256 and fn["timeout_sec"] == 5
    assert fn["environment"] == {"A": "1"} and fn["status"] == "active"
    assert fn["code_sha256"] == hashlib.sha256(PY.encode()).hexdigest()
    assert fn["code_size"] == len(PY.encode())
    assert fn["created_at"].endswith("Z") and len(fn["id"]) == 36
    got = server.request("GET", f"/api/v1/functions/{b['name']}").json()
    assert got == fn


def test_defaults(server: Server) -> None:
    fn = server.create(**body()).json()
    assert (fn["memory_mb"], fn["timeout_sec"], fn["status"], fn["description"]) == (
        128, 30, "active", "")
    assert fn["environment"] == {} and fn["max_concurrency"] == 10


def test_list_order_pagination_and_no_secrets(fresh_server: Server) -> None:
    server = fresh_server
    r = server.request("GET", "/api/v1/functions")
    assert r.json() == {"functions": [], "count": 0, "total": 0, "limit": 100, "offset": 0}
    names = ["b-fn", "a-fn", "c-fn"]
    for n in names:
        assert server.create(**body(name=n, environment={"SECRET": "hunter2"})).status_code == 201
    data = server.request("GET", "/api/v1/functions").json()
    assert [f["name"] for f in data["functions"]] == sorted(names) and data["count"] == 3
    assert "hunter2" not in str(data) and "code" not in data["functions"][0]
    assert data["functions"][0]["environment"] == ["SECRET"]
    page = server.request("GET", "/api/v1/functions", params={"limit": 1, "offset": 1}).json()
    assert [f["name"] for f in page["functions"]] == ["b-fn"] and page["count"] == 1
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
        r = server.request("GET", "/api/v1/functions", params=bad)
        assert r.status_code == 400 and r.json()["error"] is True, bad


def test_runtime_aliases(server: Server) -> None:
    for alias in ("python311", "python3"):
        assert server.create(**body(runtime=alias)).json()["runtime"] == "python3.11"
    for alias in ("nodejs", "nodejs20.x", "nodejs20"):
        fn = server.create(**body(runtime=alias, handler="index.handler",
                                  code="exports.handler = async () => 1;")).json()
        assert fn["runtime"] == "nodejs20"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "-bad"}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "dots.no"}, "name"),
        ({"description": "d" * 257}, "description"),
        ({"runtime": "ruby3.2"}, "runtime"),
        ({"runtime": None}, "runtime"),
        ({"handler": None}, "handler"),
        ({"handler": "nodot"}, "handler"),
        ({"handler": "../up.handler"}, "handler"),
        ({"handler": "a/../b.handler"}, "handler"),
        ({"handler": "/abs.handler"}, "handler"),
        ({"memory_mb": 127}, "memory_mb"),
        ({"memory_mb": 10241}, "memory_mb"),
        ({"memory_mb": "256"}, "memory_mb"),
        ({"timeout_sec": 0}, "timeout_sec"),
        ({"timeout_sec": 901}, "timeout_sec"),
        ({"environment": {"1BAD": "x"}}, "environment"),
        ({"environment": {"A": 1}}, "environment"),
        ({"environment": {"AWS_LAMBDA_FUNCTION_NAME": "x"}}, "environment"),
        ({"environment": {"_HANDLER": "x"}}, "environment"),
        ({"environment": {"LAMBDA_TASK_ROOT": "x"}}, "environment"),
        ({"environment": {"LAMBDA_RUNTIME_DIR": "x"}}, "environment"),
        ({"environment": {"BIG": "v" * 4100}}, "environment"),
        ({"status": "paused"}, "status"),
        ({"code": None}, "code"),
        ({"code_zip": "bm90IGEgemlw"}, "code"),
        ({"code": None, "code_zip": "!!!"}, "code_zip"),
        ({"code": None, "code_zip": "bm90IGEgemlw"}, "code_zip"),
        ({"id": "x"}, "id"),
        ({"code_sha256": "x"}, "code_sha256"),
        ({"created_at": "x"}, "created_at"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_validation(server: Server, over: dict[str, Any], field: str) -> None:
    r = server.create(**body(**over))
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["error"] is True and field in data["message"], data


def test_validation_of_zip_packages(server: Server) -> None:
    cases = {
        "dotdot": make_zip({"handler.py": PY, "../evil.py": "x"}),
        "absolute": make_zip({"handler.py": PY, "/etc/evil": "x"}),
        "symlink": make_zip({"handler.py": PY}, symlinks={"shadow": "/etc/shadow"}),
        "missing handler file": make_zip({"other.py": PY}),
    }
    for what, archive in cases.items():
        r = server.create(**body(code=None, code_zip=archive))
        assert r.status_code == 400 and "code_zip" in r.json()["message"], what
    many = make_zip({f"f{i}.txt": "" for i in range(10_001)} | {"handler.py": PY})
    r = server.create(**body(code=None, code_zip=many))
    assert r.status_code == 400 and "10000" in r.json()["message"]


def test_zip_package_and_subfolder_handler(server: Server) -> None:
    archive = make_zip({"src/app.py": PY, "data/x.txt": "x"})
    r = server.create(**body(code=None, code_zip=archive, handler="src/app.handler"))
    assert r.status_code == 201, r.text
    fn = r.json()
    assert fn["code_zip"] == archive and "code" not in fn
    assert fn["code_sha256"] == hashlib.sha256(base64.b64decode(archive)).hexdigest()


def test_duplicate_is_409(server: Server) -> None:
    b = body()
    assert server.create(**b).status_code == 201
    r = server.create(**b)
    assert r.status_code == 409 and b["name"] in r.json()["message"]


def test_update_put_and_patch(server: Server) -> None:
    b = body(environment={"A": "1"})
    created = server.create(**b).json()
    url = f"/api/v1/functions/{b['name']}"
    r = server.request("PATCH", url, json={"memory_mb": 512})
    assert r.status_code == 200, r.text
    fn = r.json()
    assert fn["memory_mb"] == 512 and fn["environment"] == {"A": "1"} and fn["code"] == PY
    assert fn["id"] == created["id"] and fn["created_at"] == created["created_at"]
    assert fn["updated_at"] >= created["updated_at"]
    new = "def handler(e, c):\n    return 2\n"
    fn = server.request("PUT", url, json={"code": new, "status": "inactive"}).json()
    assert fn["code"] == new and fn["status"] == "inactive" and fn["memory_mb"] == 512
    assert fn["code_sha256"] == hashlib.sha256(new.encode()).hexdigest()
    # validated exactly like create; the stored version stays intact
    for bad in ({"memory_mb": 1}, {"runtime": "cobol"}, {"environment": {"_HANDLER": "x"}},
                {"name": "other"}, {"code": "x", "code_zip": "eA=="}, {"id": "x"}):
        r = server.request("PATCH", url, json=bad)
        assert r.status_code == 400, (bad, r.text)
    assert server.request("GET", url).json() == fn
    r = server.request("PATCH", "/api/v1/functions/nope", json={"memory_mb": 256})
    assert r.status_code == 404


def test_delete(server: Server) -> None:
    b = body()
    server.create(**b)
    r = server.request("DELETE", f"/api/v1/functions/{b['name']}")
    assert r.status_code == 200
    assert r.json() == {"message": "Function deleted successfully", "name": b["name"]}
    assert server.request("GET", f"/api/v1/functions/{b['name']}").status_code == 404
    r = server.request("DELETE", f"/api/v1/functions/{b['name']}")
    assert r.status_code == 404 and r.json()["error"] is True


def test_error_statuses(server: Server) -> None:
    r = server.request("GET", "/api/v1/functions/does-not-exist")
    assert r.status_code == 404 and r.json() == {
        "error": True, "message": "function 'does-not-exist' not found"}
    r = server.request("GET", "/no/such/route")
    assert r.status_code == 404 and r.json()["error"] is True
    r = server.request("DELETE", "/api/v1/functions")
    assert r.status_code == 405 and r.json()["error"] is True
    r = server.request("POST", "/api/v1/functions", content=b"name=x",
                       headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"] is True
    r = server.request("POST", "/api/v1/functions", content=b"{not json",
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = server.request("POST", "/api/v1/functions", json=[1, 2])
    assert r.status_code == 400
    huge = b'{"name": "' + b"x" * (70 * 1024 * 1024) + b'"}'
    r = server.request("POST", "/api/v1/functions", content=huge,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] is True


def test_identical_code_stored_once_and_collected(fresh_server: Server) -> None:
    server = fresh_server
    blobs = server.data_dir / "blobs"
    code = "def handler(e, c):\n    return 'shared'\n"
    a, b = body(code=code), body(code=code)
    server.create(**a)
    server.create(**b)
    sha = hashlib.sha256(code.encode()).hexdigest()
    stored = [p for p in blobs.rglob("*") if p.is_file()]
    assert [p.name for p in stored].count(sha) == 1
    server.request("DELETE", f"/api/v1/functions/{a['name']}")
    assert (blobs / sha[:2] / sha).exists()  # still referenced by b
    server.request("PATCH", f"/api/v1/functions/{b['name']}", json={"code": PY + "#"})
    assert not (blobs / sha[:2] / sha).exists()  # nobody references it any more


HUGE = "10769225378565851394867200"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", f"/api/v1/functions?offset={HUGE}", 400),
    ("GET", "/api/v1/functions?offset=-1", 400),
    ("GET", "/api/v1/functions/{name}/invocations?offset=" + HUGE, 400),
    ("GET", "/api/v1/functions/{name}/events?offset=" + HUGE, 400),
    ("GET", "/api/v1/audit?offset=" + HUGE, 400),
    ("GET", "/api/v1/functions/{name}?qualifier=" + HUGE, 404),
    ("GET", "/api/v1/functions/{name}?qualifier=2147483648", 404),
    ("POST", "/api/v1/functions/{name}/invoke?qualifier=" + HUGE, 404),
    ("DELETE", "/api/v1/functions/{name}?qualifier=" + HUGE, 404),
])
def test_numbers_out_of_range_are_refused_not_500(server: Server, method: str, path: str,
                                                  status: int) -> None:
    """Every number a request carries is bounded before it reaches the database."""
    name = server.deploy(runtime="python3.11", handler="handler.handler",
                         code="def handler(event, context):\n    return 1\n")["name"]
    r = server.request(method, path.format(name=name))
    assert r.status_code == status, r.text
    assert r.json()["message"], r.text


def test_openapi_document_is_valid_and_complete(server: Server) -> None:
    """/openapi.json is a valid OpenAPI document: one operation id per operation, and the
    invoke route (served in front of FastAPI) described with its replies."""
    from openapi_spec_validator import validate

    r = server.request("GET", "/openapi.json")
    assert r.status_code == 200, r.text
    schema = r.json()
    validate(schema)
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    function = schema["paths"]["/api/v1/functions/{name}"]
    assert {"get", "put", "patch", "delete"} <= set(function)
    invoke = schema["paths"]["/api/v1/functions/{name}/invoke"]["post"]
    assert {"200", "202", "404", "429", "504"} <= set(invoke["responses"])
    assert "InvokeReply" in schema["components"]["schemas"]
