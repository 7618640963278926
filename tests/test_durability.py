"""Answered writes survive SIGKILL; failed updates leave the old version."""

from __future__ import annotations

import hashlib
import os

from tests.helpers import Server, make_zip, unique


def test_sigkill_restart_keeps_every_answered_write(make_server, store_env) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(env=store_env)
    expected = {}
    for i in range(20):
        name = unique("dur")
        archive = make_zip({"handler.py": f"def handler(e, c):\n    return {i}\n",
                            "blob.bin": os.urandom(2048)})
        r = server.create(name=name, runtime="python3.11", handler="handler.handler",
                          code_zip=archive)
        assert r.status_code == 201
        expected[name] = r.json()
    updated = next(iter(expected))
    r = server.request("PATCH", f"/api/v1/functions/{updated}", json={"code": "# v2\n"})
    assert r.status_code == 200
    expected[updated] = r.json()
    server.kill()

    again = make_server(env=store_env, data_dir=server.data_dir)
    for name, fn in expected.items():
        got = again.request("GET", f"/api/v1/functions/{name}").json()
        assert got == fn
        code = got.get("code", "").encode() if "code" in got else None
        if code is not None:
            assert hashlib.sha256(code).hexdigest() == fn["code_sha256"]


def test_failed_update_leaves_previous_version(make_server, store_env) -> None:  # type: ignore[no-untyped-def]
    server: Server = make_server(env=store_env)
    name = unique()
    before = server.create(name=name, runtime="python3", handler="handler.handler",
                           code="def handler(e, c):\n    return 1\n").json()
    bad = make_zip({"handler.py": "x"}, symlinks={"link": "/etc/shadow"})
    r = server.request("PUT", f"/api/v1/functions/{name}", json={"code_zip": bad,
                                                                  "memory_mb": 256})
    assert r.status_code == 400
    assert server.request("GET", f"/api/v1/functions/{name}").json() == before
