"""Background builds: a few worker threads owned by the registry.

A job is a function id; the registry's job function reads the function's row and does
whatever build it is waiting for (a create left Pending, an update left InProgress).  Jobs
carry no state of their own, so a job lost to a crash or to :meth:`BuildQueue.close` is
simply submitted again when the server starts (the row still says what is missing).

:class:`CountedPackageBuilder` is a package builder that tells a listener how each build it
runs ends (the metrics count builds by result): the native API's builds (before it answers),
these background ones and the rebuild of a package missing at an instance's start alike.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from impuls.functions.models import Code
from impuls.functions.packages import Package, PackageBuilder
from impuls.runtimes import Runtime
from impuls.store.package_archives import PackageArchives

log = logging.getLogger("impuls.builds")


class BuildQueue:
    """Runs ``job(key)`` on ``workers`` daemon threads (started on the first submit); a key
    already waiting is not queued twice."""

    def __init__(self, job: Callable[[str], None], workers: int = 2) -> None:
        self._job = job
        self._workers = workers
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0
        self._closed = False

    def submit(self, key: str) -> bool:
        """Queue a job for ``key``; False when closed or already waiting."""
        with self._lock:
            if self._closed or key in self._waiting:
                return False
            self._waiting.add(key)
            self._unfinished += 1
            if not self._threads:
                for i in range(self._workers):
                    thread = threading.Thread(target=self._work, name=f"impuls-build-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
        self._queue.put(key)
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Take no more jobs, drop the waiting ones (they are resumed at the next start) and
        give running builds ``timeout`` seconds to end (they are daemon threads)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                key = self._queue.get_nowait()
            except queue.Empty:
                break
            if key is not None:
                self._finished(key)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout / max(1, len(threads)))

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            with self._lock:
                self._waiting.discard(key)
            try:
                self._job(key)
            except Exception:
                log.exception("background build of %s failed", key)
            finally:
                self._finished(key, waiting=False)

    def _finished(self, key: str, waiting: bool = True) -> None:
        with self._idle:
            if waiting:
                self._waiting.discard(key)
            self._unfinished -= 1
            if self._unfinished == 0:
                self._idle.notify_all()


#: how a build ended: ``success`` or ``failure`` (called on the building thread)
BuildListener = Callable[[str], None]


class CountedPackageBuilder(PackageBuilder):
    """A :class:`PackageBuilder` that calls ``listener`` with the result of every build it runs
    (a package found built is no build)."""

    def __init__(self, root: Path, cache: Path, listener: BuildListener,
                 archives: PackageArchives | None = None) -> None:
        super().__init__(root, cache, archives)
        self.listener = listener

    def _build(self, key: str, runtime: Runtime, handler: str, code: Code) -> Package:
        try:
            package = super()._build(key, runtime, handler, code)
        except BaseException:
            self._tell("failure")
            raise
        self._tell("success")
        return package

    def _tell(self, result: str) -> None:
        try:
            self.listener(result)
        except Exception:  # a listener's fault never fails a build
            log.exception("a build listener failed")
