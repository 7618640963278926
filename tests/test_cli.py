"""The ``impuls`` CLI against a real server."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import Server, free_port, unique


def impuls(target: Server | str, *args: str, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI against ``target`` (a Server: with its admin key in IMPULS_API_KEY)."""
    url = target if isinstance(target, str) else target.url
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")}
    if isinstance(target, Server):
        base["IMPULS_API_KEY"] = target.admin_key
    return subprocess.run([sys.executable, "-m", "impuls", "--url", url, *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**base, **(env or {})}, cwd=cwd)


def test_deploy_ls_get_rm(server: Server, tmp_path: Path) -> None:
    name = unique("cli")
    src = tmp_path / "pkg"
    (src / "lib").mkdir(parents=True)
    (src / "app.py").write_text("def handler(e, c):\n    return 1\n")
    (src / "lib" / "util.py").write_text("X = 1\n")
    out = impuls(server, "deploy", str(src), "--name", name, "--runtime", "python3",
                 "--handler", "app.handler", "--memory", "256", "--env", "A=b=c")
    assert out.returncode == 0, out.stderr
    assert "created" in out.stdout and name in out.stdout
    fn = server.request("GET", f"/api/v1/functions/{name}").json()
    assert fn["memory_mb"] == 256 and fn["environment"] == {"A": "b=c"} and "code_zip" in fn

    single = tmp_path / "index.js"
    single.write_text("exports.handler = async () => 2;\n")
    out = impuls(server, "deploy", str(single), "--name", name, "--runtime", "nodejs",
                 "--handler", "index.handler", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["runtime"] == "nodejs20"
    assert server.request("GET", f"/api/v1/functions/{name}").json()["code"] == single.read_text()

    out = impuls(server, "ls")
    assert out.returncode == 0 and name in out.stdout and "nodejs20" in out.stdout
    listed = json.loads(impuls(server, "ls", "--json").stdout)
    assert name in [f["name"] for f in listed["functions"]]
    out = impuls(server, "get", name)
    assert out.returncode == 0 and "index.handler" in out.stdout
    assert json.loads(impuls(server, "get", name, "--json").stdout)["name"] == name

    out = impuls(server, "rm", name)
    assert out.returncode == 0
    out = impuls(server, "get", name)
    assert out.returncode == 1 and "404" in out.stderr and "not found" in out.stderr


def test_validation_error_is_one_line(server: Server, tmp_path: Path) -> None:
    f = tmp_path / "handler.py"
    f.write_text("x = 1\n")
    out = impuls(server, "deploy", str(f), "--name", unique(), "--runtime", "cobol",
                 "--handler", "handler.handler")
    assert out.returncode == 1
    assert "400" in out.stderr and "runtime" in out.stderr and len(out.stderr.splitlines()) == 1


def test_server_unreachable(tmp_path: Path) -> None:
    out = impuls(f"http://127.0.0.1:{free_port()}", "ls")
    assert out.returncode == 1
    assert "cannot reach" in out.stderr and "Traceback" not in out.stderr


def test_invoke_and_logs(server: Server, tmp_path: Path) -> None:
    name = unique("cli")
    src = tmp_path / "handler.py"
    src.write_text("def handler(e, c):\n    print('saw', e['n'])\n    if e['n'] < 0:\n"
                   "        raise ValueError('negative')\n    return {'double': e['n'] * 2}\n")
    assert impuls(server, "deploy", str(src), "--name", name, "--runtime", "python3.11",
                  "--handler", "handler.handler").returncode == 0
    out = impuls(server, "invoke", name, "--data", '{"n": 21}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"double": 42}
    event = tmp_path / "event.json"
    event.write_text('{"n": 2}')
    out = impuls(server, "invoke", name, "--file", str(event), "-v")
    assert out.returncode == 0 and json.loads(out.stdout) == {"double": 4}
    assert "warm start" in out.stderr and "saw 2" in out.stderr and " ms" in out.stderr
    out = impuls(server, "invoke", name, "--data", '{"n": -1}')
    assert out.returncode == 1 and "ValueError: negative" in out.stderr
    out = impuls(server, "logs", name)
    assert out.returncode == 0 and "saw 21" in out.stdout and "saw -1" in out.stdout
    assert impuls(server, "logs", "no-such-fn").returncode == 1


def test_logs_follow(server: Server, tmp_path: Path) -> None:
    name = unique("cli")
    src = tmp_path / "handler.py"
    src.write_text("def handler(e, c):\n    print('followed line')\n    return 1\n")
    impuls(server, "deploy", str(src), "--name", name, "--runtime", "python3.11", "--handler",
           "handler.handler")
    proc = subprocess.Popen([sys.executable, "-m", "impuls", "--url", server.url, "logs", name, "-f"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "IMPULS_API_KEY": server.admin_key})
    try:
        deadline = time.monotonic() + 20
        seen = ""
        while "followed line" not in seen and time.monotonic() < deadline:
            server.invoke(name)  # until the follower has subscribed and printed it
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                seen += proc.stdout.readline()  # type: ignore[union-attr]
        assert "followed line" in seen
    finally:
        proc.kill()
        proc.wait()
