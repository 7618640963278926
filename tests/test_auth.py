"""API keys, scopes, the audit log, TLS and ``--no-auth`` through a real server."""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, free_port, self_signed_certificate, unique

PY = "def handler(event, context):\n    return event\n"
SCOPES = ["read", "invoke", "deploy", "admin"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("auth") / "data").start()
    yield server
    server.stop()


def make_key(srv: Server, scope: str, functions: str = "*") -> dict[str, Any]:
    r = srv.request("POST", "/api/v1/keys", json={"name": unique(scope), "scope": scope,
                                                  "functions": functions})
    assert r.status_code == 201, r.text
    return dict(r.json())


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def deploy(srv: Server, name: str | None = None) -> str:
    return str(srv.deploy(name=name or unique(), runtime="python3.11", handler="handler.handler",
                          code=PY)["name"])


# (needed scope, method, path template, body); {fn} is a fresh function, {key} a fresh key
ROUTES: list[tuple[str, str, str, Any]] = [
    ("read", "GET", "/api/v1/functions", None),
    ("deploy", "POST", "/api/v1/functions", {"name": "{new}", "runtime": "python3.11",
                                             "handler": "handler.handler", "code": PY}),
    ("read", "GET", "/api/v1/functions/{fn}", None),
    ("deploy", "PATCH", "/api/v1/functions/{fn}", {"memory_mb": 256}),
    ("deploy", "PUT", "/api/v1/functions/{fn}", {"description": "put"}),
    ("deploy", "DELETE", "/api/v1/functions/{fn}", None),
    ("invoke", "POST", "/api/v1/functions/{fn}/invoke", {"x": 1}),
    ("read", "GET", "/api/v1/functions/{fn}/invocations", None),
    ("read", "GET", "/api/v1/functions/{fn}/logs", None),
    ("admin", "GET", "/api/v1/keys", None),
    ("admin", "POST", "/api/v1/keys", {"name": "{new}", "scope": "read"}),
    ("admin", "DELETE", "/api/v1/keys/{key}", None),
    ("admin", "GET", "/api/v1/audit", None),
]


@pytest.fixture(scope="module")
def keys(srv: Server) -> dict[str, str]:
    return {scope: make_key(srv, scope)["key"] for scope in SCOPES}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(("needed", "method", "path", "body"), ROUTES,
                         ids=[f"{m} {p}" for _, m, p, _ in ROUTES])
def test_scope_matrix(srv: Server, keys: dict[str, str], scope: str, needed: str, method: str,
                      path: str, body: Any) -> None:
    """Every scope against every route: allowed exactly when the scope includes the one needed."""
    fn = deploy(srv) if "{fn}" in path else ""
    victim = make_key(srv, "read")["name"] if "{key}" in path else ""
    new = unique("new")
    path = path.format(fn=fn, key=victim)
    if isinstance(body, dict):
        body = {k: (v.format(new=new) if isinstance(v, str) and v == "{new}" else v) for k, v in body.items()}
    r = srv.client.request(method, path, json=body, headers=as_key(keys[scope]))
    if SCOPES.index(scope) >= SCOPES.index(needed):
        assert r.status_code in (200, 201), r.text
    else:
        assert r.status_code == 403, r.text
        doc = r.json()
        assert doc["error"] is True and f"needs '{needed}'" in doc["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer impuls_0123456789ab_" + "x" * 43},
                                     {"Authorization": "Bearer not-a-key"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}],
                         ids=["missing", "unknown", "malformed", "not bearer"])
def test_without_a_valid_key_401(srv: Server, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/api/v1/functions"), ("POST", "/api/v1/functions/x/invoke"),
                         ("GET", "/api/v1/keys"), ("GET", "/api/v1/nope")]:
        r = httpx.request(method, srv.url + path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"] is True and "key" in r.json()["message"]


def test_a_revoked_key_stops_at_once(srv: Server) -> None:
    key = make_key(srv, "invoke")
    fn = deploy(srv)
    assert srv.client.post(f"/api/v1/functions/{fn}/invoke", headers=as_key(key["key"])).status_code == 200
    r = srv.request("DELETE", f"/api/v1/keys/{key['name']}")
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = srv.client.post(f"/api/v1/functions/{fn}/invoke", headers=as_key(key["key"]))
    assert r.status_code == 401
    listed = {k["name"]: k for k in srv.request("GET", "/api/v1/keys").json()["keys"]}
    assert listed[key["name"]]["revoked_at"] is not None
    assert srv.request("DELETE", f"/api/v1/keys/{key['name']}").status_code == 400  # already revoked
    assert srv.request("DELETE", "/api/v1/keys/no-such-key").status_code == 404


def test_function_pattern_limits_a_key(srv: Server) -> None:
    prefix = unique("orders")
    mine, other = deploy(srv, f"{prefix}-a"), deploy(srv, unique("billing"))
    key = make_key(srv, "deploy", functions=f"{prefix}-*")["key"]
    listed = srv.client.get("/api/v1/functions", headers=as_key(key)).json()
    assert [f["name"] for f in listed["functions"]] == [mine] and listed["total"] == 1
    assert srv.client.get(f"/api/v1/functions/{mine}", headers=as_key(key)).status_code == 200
    assert srv.client.post(f"/api/v1/functions/{mine}/invoke", headers=as_key(key)).status_code == 200
    for method, path in [("GET", f"/api/v1/functions/{other}"),
                         ("POST", f"/api/v1/functions/{other}/invoke"),
                         ("DELETE", f"/api/v1/functions/{other}")]:
        r = srv.client.request(method, path, headers=as_key(key))
        assert r.status_code == 403 and "limited to functions matching" in r.json()["message"]
    r = srv.client.post("/api/v1/functions", headers=as_key(key),
                        json={"name": unique("billing"), "runtime": "python3.11",
                              "handler": "handler.handler", "code": PY})
    assert r.status_code == 403
    r = srv.client.post("/api/v1/functions", headers=as_key(key),
                        json={"name": f"{prefix}-b", "runtime": "python3.11",
                              "handler": "handler.handler", "code": PY})
    assert r.status_code == 201


def test_key_requests_are_validated(srv: Server) -> None:
    for body, field in [({"name": "x y", "scope": "read"}, "name"),
                        ({"name": "k1", "scope": "root"}, "scope"),
                        ({"name": "k2", "scope": "read", "functions": "a/b"}, "functions"),
                        ({"name": "k3", "scope": "read", "extra": 1}, "extra")]:
        r = srv.request("POST", "/api/v1/keys", json=body)
        assert r.status_code == 400 and r.json()["message"].startswith(field), r.text
    name = unique("dup")
    assert srv.request("POST", "/api/v1/keys", json={"name": name, "scope": "read"}).status_code == 201
    assert srv.request("POST", "/api/v1/keys", json={"name": name, "scope": "read"}).status_code == 409


def test_health_says_little_without_a_key(srv: Server) -> None:
    bare = httpx.get(srv.url + "/health")
    assert bare.status_code == 200 and bare.json() == {"status": "healthy"}
    full = srv.request("GET", "/health").json()
    assert full["status"] == "healthy" and "sandbox" in full and "version" in full


def test_keys_are_stored_hashed_and_never_logged(srv: Server) -> None:
    key = make_key(srv, "invoke")
    fn = deploy(srv)
    assert srv.client.post(f"/api/v1/functions/{fn}/invoke", headers=as_key(key["key"])).status_code == 200
    srv.request("DELETE", f"/api/v1/keys/{key['name']}")
    assert srv.client.post(f"/api/v1/functions/{fn}/invoke", headers=as_key(key["key"])).status_code == 401
    # the key is impuls_<key id>_<secret>; the secret may hold "_" itself
    secrets = [key["key"], key["secret_access_key"], key["key"].split("_", 2)[2], srv.admin_key]
    with sqlite3.connect(srv.data_dir / "impuls.db") as db:
        dump = "\n".join(db.iterdump())
    for secret in secrets:
        assert secret not in dump
    row = sqlite3.connect(srv.data_dir / "impuls.db").execute(
        "SELECT key_hash, access_key_id FROM api_keys WHERE name = ?", (key["name"],)).fetchone()
    assert len(row[0]) == 64 and row[1] == key["access_key_id"]
    log = srv.log()
    for secret in secrets:
        assert secret not in log
    secret_file = srv.data_dir / "server-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_audit_log_records_every_change(srv: Server) -> None:
    name = deploy(srv)
    srv.request("PATCH", f"/api/v1/functions/{name}", json={"memory_mb": 256})
    srv.request("DELETE", f"/api/v1/functions/{name}")
    key = make_key(srv, "read")
    srv.request("DELETE", f"/api/v1/keys/{key['name']}")
    assert srv.request("PATCH", "/api/v1/functions/no-such-fn", json={"memory_mb": 256}).status_code == 404
    entries = srv.request("GET", "/api/v1/audit", params={"limit": 50}).json()["entries"]
    seen = [(e["action"], e["target"]) for e in entries]
    expected = [("key.revoke", key["name"]), ("key.create", key["name"]), ("function.delete", name),
                ("function.update", name), ("function.create", name)]
    assert [s for s in seen if s in expected] == expected  # newest first, each once
    assert ("function.update", "no-such-fn") not in seen  # a failed change leaves no entry
    for e in entries:
        if (e["action"], e["target"]) in expected:
            assert e["key_name"] == "IMPULS_ADMIN_KEY" and e["source"] == "127.0.0.1"
            assert e["at"].endswith("Z")
    update = next(e for e in entries if e["action"] == "function.update" and e["target"] == name)
    assert update["detail"]["fields"] == ["memory_mb"] and update["detail"]["revision"] == 2


def test_wrong_keys_in_a_row_leave_the_server_serving(srv: Server) -> None:
    """1,000 requests with wrong keys, all 401, while a valid key keeps getting its answers."""
    fn = deploy(srv)
    good: list[int] = []

    def valid_calls() -> None:
        with httpx.Client(base_url=srv.url, headers=as_key(srv.admin_key), timeout=30) as c:
            for _ in range(100):
                good.append(c.post(f"/api/v1/functions/{fn}/invoke", json={}).status_code)

    def wrong(i: int) -> int:
        key = f"impuls_{i:012x}_{'A' * 43}" if i % 2 else f"wrong-{i}"
        return wrong_client.post(f"/api/v1/functions/{fn}/invoke", headers=as_key(key)).status_code

    with httpx.Client(base_url=srv.url, timeout=30) as wrong_client, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        valid = pool.submit(valid_calls)
        statuses = [wrong(i) for i in range(1000)]
        valid.result()
    assert statuses == [401] * 1000
    assert good == [200] * 100
    assert httpx.get(srv.url + "/health").status_code == 200


# --- servers of their own ----------------------------------------------------------------


def _cli(url: str, *args: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")}
    return subprocess.run([sys.executable, "-m", "impuls", "--url", url, *args], capture_output=True,
                          text=True, timeout=60, check=False, env={**base, **(env or {})}, cwd=cwd)


def test_first_start_writes_an_admin_key_the_cli_uses(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_ADMIN_KEY": ""})
    key_file = server.data_dir / "admin-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key.startswith("impuls_") and str(key_file.resolve()) in server.log()
    assert key not in server.log()
    r = httpx.get(server.url + "/api/v1/functions", headers=as_key(key))
    assert r.status_code == 200
    # the CLI finds the key in the data dir (IMPULS_DATA_DIR) with no key given
    out = _cli(server.url, "keys", "create", "ci", "--scope", "invoke",
               env={"IMPULS_DATA_DIR": str(server.data_dir)})
    assert out.returncode == 0, out.stderr
    assert "aws_secret_access_key" in out.stdout and "key:" in out.stdout
    out = _cli(server.url, "keys", "ls", env={"IMPULS_DATA_DIR": str(server.data_dir)})
    assert out.returncode == 0 and "ci" in out.stdout and "invoke" in out.stdout
    out = _cli(server.url, "audit", env={"IMPULS_DATA_DIR": str(server.data_dir)})
    assert out.returncode == 0 and "key.create" in out.stdout
    out = _cli(server.url, "--api-key", key, "keys", "revoke", "ci")
    assert out.returncode == 0, out.stderr
    out = _cli(server.url, "ls", cwd=server.data_dir)  # no key anywhere
    assert out.returncode == 1 and "401" in out.stderr
    # a restart keeps the key and makes no new one
    server.stop()
    again = make_server(env={"IMPULS_ADMIN_KEY": ""}, data_dir=server.data_dir)
    assert key_file.read_text().strip() == key
    assert httpx.get(again.url + "/api/v1/functions", headers=as_key(key)).status_code == 200


def test_admin_key_from_the_environment(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_ADMIN_KEY": "automation-admin-key-0123456789"})
    assert not (server.data_dir / "admin-key").exists()
    r = httpx.get(server.url + "/api/v1/keys", headers=as_key("automation-admin-key-0123456789"))
    assert r.status_code == 200
    assert httpx.get(server.url + "/api/v1/keys", headers=as_key("automation-admin-key")).status_code == 401


def test_no_auth_only_on_loopback(make_server: Callable[..., Server], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "impuls", "server", "--host", "0.0.0.0", "--port",
                          str(free_port()), "--data-dir", str(tmp_path / "d"), "--no-auth"],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")})
    assert out.returncode == 1
    assert "loopback" in out.stderr and "0.0.0.0" in out.stderr
    server = make_server(args=["--no-auth"], env={"IMPULS_ADMIN_KEY": ""})
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "healthy" and health["auth"] == "off"
    assert httpx.get(server.url + "/api/v1/functions").status_code == 200
    assert "authentication is OFF" in server.log()


def test_https_with_a_self_signed_certificate(make_server: Callable[..., Server], tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server = make_server(args=["--tls-cert", str(cert), "--tls-key", str(key)], https=True)
    assert server.url.startswith("https://")
    trusted = ssl.create_default_context(cafile=str(cert))
    r = httpx.get(server.url + "/api/v1/functions", headers=as_key(server.admin_key), verify=trusted)
    assert r.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")  # not trusted without the certificate
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url.replace("https://", "http://") + "/health")
    out = _cli(server.url, "--ca-cert", str(cert), "ls", env={"IMPULS_API_KEY": server.admin_key})
    assert out.returncode == 0, out.stderr
    out = _cli(server.url, "ls", env={"IMPULS_API_KEY": server.admin_key})
    assert out.returncode == 1 and "cannot reach" in out.stderr
    assert "listening on https://" in server.log()


def test_revoke_takes_effect_within_a_second_even_when_cached(srv: Server) -> None:
    """A key used a moment ago (so its lookup is cached) is refused right after its revoke."""
    key = make_key(srv, "read")
    for _ in range(3):
        assert srv.client.get("/api/v1/functions", headers=as_key(key["key"])).status_code == 200
    srv.request("DELETE", f"/api/v1/keys/{key['name']}")
    assert srv.client.get("/api/v1/functions", headers=as_key(key["key"])).status_code == 401
