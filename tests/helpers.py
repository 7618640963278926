"""Starting real Impuls servers for tests."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from impuls.sandbox import microvm, namespace
from impuls.sandbox.runtime_api import Invocation

ROOT = Path(__file__).resolve().parents[1]


def sandbox_unavailable(kind: str, request: pytest.FixtureRequest) -> str | None:
    """Why the ``kind`` sandbox cannot run on this host (None: it can).  For ``microvm``
    the guest images are built first (the ``images_dir`` fixture)."""
    if kind == "process":
        return None
    if kind == "namespace":
        return namespace.available()
    if kind == "microvm":
        return microvm.available(request.getfixturevalue("images_dir"))
    raise ValueError(f"unknown sandbox {kind!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str = "fn") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (``cert.pem``, ``key.pem`` in ``directory``)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def make_zip(files: Mapping[str, str | bytes], symlinks: Mapping[str, str] | None = None) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return base64.b64encode(buf.getvalue()).decode()


class Server:
    """``impuls server`` as a child process on a free port.

    It has an admin key of its own (``IMPULS_ADMIN_KEY``, in ``admin_key``) that ``client``
    sends with every request, unless ``env`` gives one or turns authentication off.
    """

    def __init__(self, data_dir: Path, env: Mapping[str, str] | None = None,
                 args: list[str] | None = None, https: bool = False,
                 wrapper: list[str] | None = None) -> None:
        """``wrapper``: a command that execs the server (e.g. ``prlimit ... --``)."""
        self.data_dir = data_dir
        self.wrapper = wrapper or []
        self.port = free_port()
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")}
        self.env = {**inherited, "IMPULS_ADMIN_KEY": f"test-admin-{uuid.uuid4().hex}", **(env or {})}
        self.admin_key = self.env["IMPULS_ADMIN_KEY"]
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=headers, verify=not https)

    def start(self, timeout: float = 30) -> Server:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "impuls", "server", "--port", str(self.port),
             "--data-dir", str(self.data_dir), *self.args],
            env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=self.data_dir.parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.client.request(method, path, **kw)

    def create(self, **body: Any) -> httpx.Response:
        return self.client.post("/api/v1/functions", json=body)

    def deploy(self, **body: Any) -> dict[str, Any]:
        """Create a function (a unique name unless given); fail the test on any error."""
        body.setdefault("name", unique())
        r = self.create(**body)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def invoke(self, name: str, event: Any = None, **params: Any) -> httpx.Response:
        content = b"" if event is None else json.dumps(event).encode()
        return self.client.post(f"/api/v1/functions/{name}/invoke", content=content,
                                params=params, headers={"Content-Type": "application/json"})

    def processes_in_data_dir(self) -> list[int]:
        """Host pids whose working directory is inside this server's data directory."""
        return processes_under(self.data_dir)


def processes_under(directory: Path) -> list[int]:
    root = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if cwd.startswith(root) and state != "Z":
                found.append(int(entry.name))
    return found


def live_pids(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Host pids of live (non-zombie) processes whose argv satisfies ``match``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and match(args):
            found.append(int(entry.name))
    return found


def processes_with(argument: str) -> list[int]:
    """Host pids of live processes with ``argument`` on their command line."""
    return live_pids(lambda args: argument.encode() in args)


def invocation(event: object, timeout: float = 5.0, function: str = "conformance") -> Invocation:
    """An Invocation for driving an instance directly (no server)."""
    return Invocation(request_id=str(uuid.uuid4()), payload=json.dumps(event).encode(),
                      deadline_ms=int((time.time() + timeout) * 1000),
                      function_arn=f"arn:aws:lambda:us-east-1:000000000000:function:{function}")
