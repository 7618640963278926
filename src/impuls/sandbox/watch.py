"""Watching child processes from the event loop, and pid files for crash recovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

from impuls.sandbox.base import OutputCapture

READ_CHUNK = 65536


class OutputPump:
    """Reads a pipe from the event loop into an OutputCapture (non-blocking)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self._fd: int | None = fd
        self.capture: OutputCapture | None = None
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._read, True)

    def _read(self, once: bool = False) -> None:
        while self._fd is not None:
            try:
                data = os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            if self.capture is not None:
                self.capture.feed(data)
            if once and len(data) < READ_CHUNK:
                return

    def drain(self) -> None:
        """Read everything the pipe holds right now."""
        self._read()

    def close(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


class ProcessWatch:
    """Notices a child's exit (pidfd) and pumps its stdout/stderr pipe into an OutputCapture."""

    def __init__(self, proc: subprocess.Popen[bytes], output_fd: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.proc = proc
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self._pump = OutputPump(self.loop, output_fd)
        self._pidfd: int | None = os.pidfd_open(proc.pid)
        self.loop.add_reader(self._pidfd, self._on_exit)

    def output_to(self, capture: OutputCapture) -> None:
        self._pump.capture = capture

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        status = self.proc.wait()
        if not self.exited.done():
            self.exited.set_result(status)

    def drain(self) -> None:
        """Read everything the pipe holds right now."""
        self._pump.drain()

    async def wait_closed(self) -> None:
        """Wait for the exit (after the caller killed the process), then close the pipe."""
        await self.exited
        self._pump.drain()
        self._pump.close()


def _children() -> dict[int, list[int]]:
    """ppid → child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def kill_tree(root: int, rounds: int = 5) -> None:
    """SIGKILL ``root``'s process group and every descendant, including those
    that left the group with setsid (found through their parent links).
    A descendant that double-forked away from the tree is out of reach: only
    the namespace and microvm sandboxes contain those."""
    for _ in range(rounds):
        tree = _children()
        found, stack = [], [root]
        while stack:
            pid = stack.pop()
            kids = tree.get(pid, [])
            found.extend(kids)
            stack.extend(kids)
        for target in (root, *found):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(target, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, signal.SIGKILL)
        if not found:
            return


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class PidFile:
    """``<run_dir>/<instance>.json``: which process group to kill if the server dies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def write(cls, run_dir: Path, instance_id: str, pid: int) -> PidFile:
        path = run_dir / f"{instance_id}.json"
        path.write_text(json.dumps({"pid": pid, "start": _start_time(pid)}))
        return cls(path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def reap_all(run_dir: Path) -> int:
        """SIGKILL every recorded process group still alive (same pid *and* start time)."""
        count = 0
        for path in run_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                info = json.loads(path.read_text())
                pid = int(info["pid"])
                if info.get("start") and _start_time(pid) == info["start"]:
                    os.killpg(pid, signal.SIGKILL)
                    count += 1
            path.unlink(missing_ok=True)
        return count
