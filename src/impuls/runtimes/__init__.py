"""The runtime registry: which languages this host can run, and how.

A runtime is a Lambda Runtime API client plus what runs it: an interpreter
and a client file under ``runtimes/<language>/`` (Python, Node.js), or the
package's own ``bootstrap`` executable (Go and Java, built by Impuls; ``provided``,
brought by the user).  Only runtimes whose tools are installed are
*available*; create and update accept nothing else.  New runtimes are added
here, in :func:`_builtin_runtimes`, and nowhere else (see
``docs/adding-runtimes.md``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from impuls.errors import InvalidInput
from impuls.runtimes import build_steps, node_dist

RUNTIMES_DIR = Path(__file__).resolve().parent

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MODULE_HANDLER = re.compile(
    rf"^(?P<module>{_SEGMENT}(?:/{_SEGMENT})*)\.(?P<func>[A-Za-z_$][A-Za-z0-9_$]*)$")
_GO_HANDLER = re.compile(r"^[A-Z][A-Za-z0-9_]*$")
# Lambda's .NET form: Assembly::Namespace.Class::Method
_DOTNET_HANDLER = re.compile(
    r"^(?P<assembly>[A-Za-z0-9_][A-Za-z0-9_.-]*)::[A-Za-z_][A-Za-z0-9_.+]*::[A-Za-z_][A-Za-z0-9_]*$")
# Lambda's Ruby form: FILE.METHOD or FILE.Module::Class.METHOD (FILE may contain '/', no '.')
_RUBY_HANDLER = re.compile(
    r"^(?P<module>[A-Za-z0-9_][A-Za-z0-9_-]*(?:/[A-Za-z0-9_][A-Za-z0-9_-]*)*)"
    r"\.(?:[A-Z][A-Za-z0-9_]*(?:::[A-Z][A-Za-z0-9_]*)*\.)?[a-z_][A-Za-z0-9_]*[?!]?$")
_ANY_HANDLER = re.compile(r"^[^\s\x00-\x1f]{1,256}$")
_JAVA_NAME = r"[A-Za-z_$][A-Za-z0-9_$]*"
_JAVA_HANDLER = re.compile(rf"^(?P<cls>{_JAVA_NAME}(?:\.{_JAVA_NAME})*)(?:::{_JAVA_NAME})?$")

#: (package dir, handler, tool cache dir) -> build log; raises build_steps.BuildStepFailed
BuildStep = Callable[[Path, str, Path], str]


@dataclass(frozen=True)
class Runtime:
    """One runtime id: how to recognise it, check a handler, build and start it."""

    id: str
    aliases: tuple[str, ...]
    language: str
    #: the interpreter that runs ``bootstrap``; None: the package's ./bootstrap is the program
    interpreter: str | None
    #: the runtime client file (None for runtimes whose package brings its own)
    bootstrap: Path | None
    installed: bool
    version: str = ""
    extension: str = ""
    module_extensions: tuple[str, ...] = ()
    handler_rule: Literal["module", "ruby", "dotnet", "go", "java", "any"] = "module"
    build: BuildStep | None = None
    #: the client can reach the Runtime API over IMPULS_RUNTIME_API_SOCKET (else TCP only)
    unix_socket_client: bool = True
    sandboxes: tuple[str, ...] = ("process", "namespace")
    #: the namespace sandbox may start the client ahead of time, before the function is known:
    #: it then reads its environment and working directory from IMPULS_PRESTART_FD first
    prestarts: bool = False
    host_paths: tuple[str, ...] = ("/usr",)

    def command(self, task_root: str, client: str | None = None) -> list[str]:
        """argv that starts the runtime; ``client`` is where the client file is seen
        from inside the sandbox (default: its host path)."""
        if self.bootstrap is None:
            return [f"{task_root}/bootstrap"]
        assert self.interpreter is not None
        return [self.interpreter, client or str(self.bootstrap)]

    def check_handler(self, handler: str) -> str:
        """Validate ``handler``; for module handlers return the module path
        (``src/app.main`` → ``src/app``).  Raises InvalidInput naming the rule."""
        if self.handler_rule == "go":
            if not _GO_HANDLER.match(handler):
                raise InvalidInput("handler: must name an exported Go function such as 'Handler' "
                                   f"(^[A-Z][A-Za-z0-9_]*$), got {handler!r}")
            return handler
        if self.handler_rule == "java":
            java = _JAVA_HANDLER.match(handler)
            if not java:
                raise InvalidInput("handler: must be 'package.Class' or 'package.Class::method', "
                                   f"got {handler!r}")
            return java["cls"]
        if self.handler_rule == "dotnet":
            match = _DOTNET_HANDLER.match(handler)
            if not match:
                raise InvalidInput("handler: must be 'Assembly::Namespace.Class::Method' such as "
                                   f"'Function::Example.Function::Handler', got {handler!r}")
            return handler
        if self.handler_rule == "any":
            if not _ANY_HANDLER.match(handler):
                raise InvalidInput("handler: 1-256 characters without spaces or control characters")
            return handler
        if self.handler_rule == "ruby":
            match = _RUBY_HANDLER.match(handler)
            if not match:
                raise InvalidInput("handler: must be 'file.method' or 'file.Module::Class.method' (file may "
                                   f"contain '/' for sub-folders), got {handler!r}")
            return match["module"]
        match = _MODULE_HANDLER.match(handler)
        if not match or any(part in ("", ".", "..") for part in match["module"].split("/")):
            raise InvalidInput(
                "handler: must be 'module.function' (module may contain '/' for sub-folders, "
                f"no '..'), got {handler!r}"
            )
        return match["module"]

    def code_filename(self, handler: str) -> str:
        """The file name a single-file ``code`` is stored under (``index.js``, ``main.go``,
        ``Hello.java`` for ``example.Hello::handleRequest``: a public class's file is its simple name)."""
        if self.handler_rule == "go":
            return "main.go"
        if self.handler_rule == "java":
            return self.check_handler(handler).rsplit(".", 1)[-1] + self.extension
        if self.handler_rule == "dotnet":
            return "Function.cs"
        if self.handler_rule == "any":
            return "bootstrap"
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
        id="python3.11", aliases=("python311", "python3"), language="python",
        interpreter=interp, bootstrap=RUNTIMES_DIR / "python" / "bootstrap.py",
        installed=interp is not None,
        version=_version_of([interp, "--version"]) if interp else "",
        extension=".py", module_extensions=(".py",), build=build_steps.python_requirements,
        sandboxes=("process", "namespace", "microvm"),
    )


def _node(release: node_dist.Release, aliases: tuple[str, ...]) -> Runtime:
    """A pinned Node.js (:mod:`impuls.runtimes.node_dist`), the same in every sandbox."""
    return Runtime(
        id=f"nodejs{release.major}", aliases=(f"nodejs{release.major}.x", *aliases), language="nodejs",
        interpreter=str(release.binary), bootstrap=RUNTIMES_DIR / "nodejs" / "bootstrap.js",
        installed=node_dist.installed(release), version=f"v{release.version}",
        extension=".js", module_extensions=(".js", ".mjs", ".cjs"), build=build_steps.node_modules,
        prestarts=True,
        sandboxes=("process", "namespace", "microvm"),
    )


def _ruby() -> Runtime:
    ruby = _find(["/usr/bin/ruby3.1", "/usr/bin/ruby"])
    return Runtime(
        id="ruby3.1", aliases=("ruby",), language="ruby",
        interpreter=ruby, bootstrap=RUNTIMES_DIR / "ruby" / "bootstrap.rb",
        installed=ruby is not None, version=_version_of([ruby, "--version"]) if ruby else "",
        extension=".rb", module_extensions=(".rb",), handler_rule="ruby",
        sandboxes=("process", "namespace", "microvm"),
    )


def _dotnet_mono() -> Runtime:
    """C# on Mono (Debian 12's 6.8: mcs's C# 7 and the .NET Framework 4.x class library), not .NET."""
    mono, mcs = _find(["/usr/bin/mono"]), _find(["/usr/bin/mcs"])
    installed = mono is not None and mcs is not None and build_steps.NEWTONSOFT_JSON.is_file()
    version = (_version_of([mono, "--version"]).splitlines() or [""])[0] if mono else ""
    return Runtime(
        id="dotnet-mono", aliases=(), language="dotnet", interpreter=None, bootstrap=None,
        installed=installed, version=version, extension=".cs", handler_rule="dotnet",
        build=build_steps.dotnet_assembly, sandboxes=("process", "namespace", "microvm"),
        # /etc/mono/config maps "libc" and co. to their sonames: without it, sockets fail
        host_paths=("/usr", "/etc/mono"),
    )


def _go() -> Runtime:
    go = _find(["/usr/bin/go", "/usr/local/go/bin/go", "go"])
    return Runtime(
        id="go1.x", aliases=("go",), language="go", interpreter=None, bootstrap=None,
        installed=go is not None, version=_version_of([go, "version"]) if go else "",
        extension=".go", handler_rule="go", build=build_steps.go_binary,
        sandboxes=("process", "namespace", "microvm"),
    )


def _java() -> Runtime:
    """Debian's OpenJDK 17 and Jackson; the package is built into a ``bootstrap`` that starts the
    client (:func:`impuls.runtimes.build_steps.java_package`)."""
    java = _find([str(build_steps.JAVA_HOME / "bin" / "java")])
    javac = _find([str(build_steps.JAVA_HOME / "bin" / "javac")])
    jackson = all(Path(jar).is_file() for jar in build_steps.JACKSON_JARS)
    return Runtime(
        id="java17", aliases=("java",), language="java", interpreter=None, bootstrap=None,
        installed=bool(java and javac and jackson),
        version=_version_of([java, "-version"]).partition("\n")[0] if java else "",
        extension=".java", handler_rule="java", build=build_steps.java_package,
        sandboxes=("process", "namespace", "microvm"),
        # the JDK's configuration is linked from /usr/lib/jvm into /etc
        host_paths=("/usr", "/etc/java-17-openjdk"),
    )


def _provided() -> Runtime:
    return Runtime(
        id="provided", aliases=("provided.al2", "provided.al2023"), language="provided",
        interpreter=None, bootstrap=None, installed=True, handler_rule="any",
        build=build_steps.provided_bootstrap, unix_socket_client=False,
        sandboxes=("process", "namespace", "microvm"),
    )


def _builtin_runtimes() -> list[Runtime]:
    return [_python(), _node(node_dist.RELEASES["20"], ("nodejs",)), _node(node_dist.RELEASES["22"], ()),
            _go(), _java(), _ruby(), _dotnet_mono(), _provided()]


class RuntimeRegistry:
    """Looks runtimes up by id or alias; knows which are available here."""

    def __init__(self, runtimes: Iterable[Runtime]) -> None:
        self._all = list(runtimes)
        self._by_name: dict[str, Runtime] = {}
        for rt in self._all:
            for name in (rt.id, *rt.aliases):
                self._by_name[name] = rt

    def available(self) -> list[Runtime]:
        return [rt for rt in self._all if rt.installed]

    def describe_available(self) -> str:
        return ", ".join(
            f"{rt.id} (aliases: {', '.join(rt.aliases)})" if rt.aliases else rt.id
            for rt in self.available()
        ) or "none"

    def resolve(self, name: str) -> Runtime:
        """The available runtime called ``name`` (id or alias), or InvalidInput."""
        rt = self._by_name.get(name)
        if rt is None or not rt.installed:
            reason = "is not installed on this host" if rt else "is unknown"
            raise InvalidInput(
                f"runtime: {name!r} {reason}; available runtimes: {self.describe_available()}"
            )
        return rt


@cache
def default_registry() -> RuntimeRegistry:
    """The registry of built-in runtimes, detected once per process."""
    return RuntimeRegistry(_builtin_runtimes())
