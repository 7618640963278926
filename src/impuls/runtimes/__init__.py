"""The runtime registry: which languages this host can run, and how.

A runtime is a Lambda Runtime API client (``runtimes/<language>/bootstrap*``)
plus the interpreter that runs it.  Only runtimes whose interpreter is
installed are *available*; create and update accept nothing else.  New
runtimes are added here, in :func:`_builtin_runtimes`, and nowhere else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from impuls.errors import InvalidInput

RUNTIMES_DIR = Path(__file__).resolve().parent

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MODULE_HANDLER = re.compile(rf"^(?P<module>{_SEGMENT}(?:/{_SEGMENT})*)\.(?P<func>[A-Za-z_$][A-Za-z0-9_$]*)$")


@dataclass(frozen=True)
class Runtime:
    """One runtime id: how to recognise it, check a handler and start it."""

    id: str
    aliases: tuple[str, ...]
    language: str
    extension: str
    interpreter: str | None
    bootstrap: Path
    version: str = ""
    module_extensions: tuple[str, ...] = ()
    sandboxes: tuple[str, ...] = ("process", "namespace")
    host_paths: tuple[str, ...] = field(default=("/usr",))

    @property
    def available(self) -> bool:
        return self.interpreter is not None

    def command(self) -> list[str]:
        """argv that starts the runtime client on the host."""
        assert self.interpreter is not None
        return [self.interpreter, str(self.bootstrap)]

    def check_handler(self, handler: str) -> str:
        """Return the module path of ``handler`` (``src/app.main`` → ``src/app``).

        Raises InvalidInput naming the rule when the handler is malformed.
        """
        match = _MODULE_HANDLER.match(handler)
        if not match or ".." in handler.split("/") or any(
            part in ("", ".", "..") for part in match["module"].split("/")
        ):
            raise InvalidInput(
                "handler: must be 'module.function' (module may contain '/' for sub-folders, "
                f"no '..'), got {handler!r}"
            )
        return match["module"]

    def code_filename(self, handler: str) -> str:
        """The file name a single-file ``code`` is stored under, e.g. ``index.js``."""
        return self.check_handler(handler) + self.extension


def _find(candidates: Iterable[str]) -> str | None:
    for candidate in candidates:
        path = candidate if candidate.startswith("/") else shutil.which(candidate)
        if path and Path(path).is_file():
            return str(Path(path))
    return None


def _version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return (out.stdout or out.stderr).strip()


def _python() -> Runtime:
    # The system interpreter, not the one Impuls runs in: functions must not
    # see Impuls's own packages.
    interp = _find(["/usr/bin/python3.11", "/usr/local/bin/python3.11"])
    return Runtime(
        id="python3.11",
        aliases=("python311", "python3"),
        language="python",
        extension=".py",
        interpreter=interp,
        bootstrap=RUNTIMES_DIR / "python" / "bootstrap.py",
        module_extensions=(".py",),
        version=_version_of([interp, "--version"]) if interp else "",
    )


def _node() -> Runtime:
    node = _find(["/usr/bin/node", "/usr/local/bin/node", "node"])
    version = _version_of([node, "--version"]) if node else ""
    return Runtime(
        id="nodejs20",
        aliases=("nodejs20.x", "nodejs"),
        language="nodejs",
        extension=".js",
        interpreter=node if version.startswith("v20.") else None,
        bootstrap=RUNTIMES_DIR / "nodejs" / "bootstrap.js",
        module_extensions=(".js", ".mjs", ".cjs"),
        version=version,
    )


def _builtin_runtimes() -> list[Runtime]:
    return [_python(), _node()]


class RuntimeRegistry:
    """Looks runtimes up by id or alias; knows which are available here."""

    def __init__(self, runtimes: Iterable[Runtime]) -> None:
        self._all = list(runtimes)
        self._by_name: dict[str, Runtime] = {}
        for rt in self._all:
            for name in (rt.id, *rt.aliases):
                self._by_name[name] = rt

    def available(self) -> list[Runtime]:
        return [rt for rt in self._all if rt.available]

    def describe_available(self) -> str:
        return ", ".join(
            f"{rt.id} (aliases: {', '.join(rt.aliases)})" if rt.aliases else rt.id
            for rt in self.available()
        ) or "none"

    def resolve(self, name: str) -> Runtime:
        """The available runtime called ``name`` (id or alias), or InvalidInput."""
        rt = self._by_name.get(name)
        if rt is None or not rt.available:
            reason = "is not installed on this host" if rt else "is unknown"
            raise InvalidInput(
                f"runtime: {name!r} {reason}; available runtimes: {self.describe_available()}"
            )
        return rt


@cache
def default_registry() -> RuntimeRegistry:
    """The registry of built-in runtimes, detected once per process."""
    return RuntimeRegistry(_builtin_runtimes())
