"""The servers under test, each a child process on a free 127.0.0.1 port, stopped after its rows."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import API_KEY, Client
from bench.workloads import Workload

STOP_GRACE = 30.0


class ServerRefused(RuntimeError):
    """The server exited (or never answered) instead of starting: e.g. an unsupported sandbox."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


KEPT_SETTINGS = ("IMPULS_IMAGES_DIR",)  # where microVM guest images are: changes nothing measured
ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    """The harness's environment without IMPULS_* settings that would change what is measured.
    Guest images are looked up in IMPULS_IMAGES_DIR, else in the checkout's .impuls/images (where
    ``impuls images build`` run from the checkout puts them), as every run has a fresh data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_") or k in KEPT_SETTINGS}
    if "IMPULS_IMAGES_DIR" not in env and (ROOT / ".impuls" / "images").is_dir():
        env["IMPULS_IMAGES_DIR"] = str(ROOT / ".impuls" / "images")
    return env


class ServerProcess:
    """A server started as ``argv`` (with ``{port}`` filled in), ready once ``GET health`` is 200."""

    def __init__(self, label: str, argv: list[str], log_path: Path, health: str = "/health",
                 env: dict[str, str] | None = None) -> None:
        self.label = label
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.log_path = log_path
        self.health = health
        self.env = env or _clean_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(self.url)
        self.health_doc: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerRefused(self._why())
            with contextlib.suppress(OSError):
                status, doc, _ = Client(self.url, timeout=2).request("GET", self.health)
                if status == 200:
                    self.health_doc = doc
                    return self
            time.sleep(0.05)
        self.stop()
        raise ServerRefused(f"no answer on {self.url}{self.health} within {timeout:.0f} s; {self._why()}")

    def _why(self) -> str:
        lines = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "error" in x.lower()]
        return (errors or lines or ["(no output)"])[-1].strip()

    def stop(self) -> None:
        """SIGTERM (the server drains and removes its sandboxes), SIGKILL after a grace period."""
        self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ImpulsServer(ServerProcess):
    """``impuls server --sandbox S`` with a fresh data directory."""

    def __init__(self, sandbox: str, data_dir: Path, log_path: Path, database_url: str = "",
                 otlp_endpoint: str = "") -> None:
        """``database_url``: a PostgreSQL store instead of the data directory's SQLite;
        ``otlp_endpoint``: tracing on, exporting there."""
        argv = [sys.executable, "-m", "impuls", "server", "--port", "{port}",
                "--data-dir", str(data_dir), "--sandbox", sandbox]
        env = {**_clean_env(), "IMPULS_ADMIN_KEY": API_KEY}
        env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}  # the SDK's defaults
        if database_url:
            env["IMPULS_DATABASE_URL"] = database_url
        if otlp_endpoint:
            env["IMPULS_OTLP_ENDPOINT"] = otlp_endpoint
        super().__init__(f"impuls {'traced ' if otlp_endpoint else ''}({sandbox})", argv, log_path, env=env)
        self.sandbox = sandbox

    def start(self, timeout: float = 60.0) -> ImpulsServer:
        super().start(timeout)
        actual = (self.health_doc or {}).get("sandbox")
        if actual != self.sandbox:
            self.stop()
            raise ServerRefused(f"asked for sandbox {self.sandbox!r}, the server runs {actual!r}")
        return self

    def call(self, method: str, path: str, doc: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        body = None if doc is None else json.dumps(doc).encode()
        status, data, _ = self.client.request(method, path, body)
        if status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data}")
        return data

    def create(self, name: str, workload: Workload, max_concurrency: int) -> str:
        """Create function ``name``; returns its invoke path."""
        self.call("POST", "/api/v1/functions", {
            "name": name, "runtime": workload.runtime, "handler": workload.handler,
            "code": workload.code, "memory_mb": 128, "max_concurrency": max_concurrency,
        })
        return f"/api/v1/functions/{name}/invoke"

    def touch(self, name: str, serial: int) -> None:
        """A configuration update: retires the function's instances, so the next call is cold."""
        self.call("PATCH", f"/api/v1/functions/{name}", {"description": f"bench cold start {serial}"})
