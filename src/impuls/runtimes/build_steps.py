"""Build steps that turn an unpacked package into what a runtime runs.

Each step gets the package directory (writable, being built) and the
function's handler, changes the directory in place and returns its log; it
raises :class:`BuildStepFailed` (with the log) when the package cannot work.
Steps run once per code version (see :mod:`impuls.functions.packages`), never
per call or per instance.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from impuls.runtimes import node_dist

BUILD_TIMEOUT = 600
GO_WRAPPER = Path(__file__).resolve().parent / "go" / "impuls_main.go"
DOTNET_DIR = Path(__file__).resolve().parent / "dotnet"
#: Debian's Newtonsoft.Json (libnewtonsoft-json-cil-dev); at run time Mono loads it from the GAC
NEWTONSOFT_JSON = Path("/usr/lib/cli/Newtonsoft.Json-5.0/Newtonsoft.Json.dll")
#: what the dotnet-mono build adds to a package: the client and the Lambda interfaces
DOTNET_CLIENT = ("Amazon.Lambda.Core.dll", "impuls_bootstrap.exe")
#: referenced besides mcs's defaults (mscorlib, System, System.Core, System.Xml): the rest of the
#: class library Debian's mono-runtime and Newtonsoft.Json install (also in the microVM guest)
DOTNET_REFERENCES = ("System.Xml.Linq", "System.Data", "System.Numerics", "System.Runtime.Serialization",
                     "Microsoft.CSharp")
DOTNET_BOOTSTRAP = '#!/bin/sh\nexec /usr/bin/mono --debug "$LAMBDA_TASK_ROOT/impuls_bootstrap.exe"\n'


class BuildStepFailed(Exception):
    def __init__(self, summary: str, log: str) -> None:
        super().__init__(summary)
        self.summary = summary
        self.log = log


def _run(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    try:
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildStepFailed(f"{what} took longer than {BUILD_TIMEOUT} s", str(exc.output or "")) from exc
    except OSError as exc:
        raise BuildStepFailed(f"{what} could not start: {exc}", "") from exc
    log = f"$ {' '.join(argv)}\n{out.stdout}{out.stderr}"
    if out.returncode != 0:
        raise BuildStepFailed(f"{what} failed (exit status {out.returncode})", log)
    return log


#: the host's CA certificates (Debian's ca-certificates), which a registry mirror may need
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _tool_env(cache: Path) -> dict[str, str]:
    """A small, explicit environment for build tools (never the server's secrets)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(cache / "home"),
        "LANG": "C.UTF-8",
        "GOCACHE": str(cache / "go-build"),
        "GOPATH": str(cache / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
        "npm_config_cache": str(cache / "npm"),
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
    }


def python_requirements(package: Path, handler: str, cache: Path) -> str:
    """``requirements.txt`` → its packages installed into the package (pip --target)."""
    if not (package / "requirements.txt").is_file():
        return ""
    return _run([sys.executable, "-m", "pip", "install", "--no-input", "--target", str(package),
                 "-r", "requirements.txt"], package, _tool_env(cache), "pip install")


def node_modules(package: Path, handler: str, cache: Path) -> str:
    """``package.json`` → ``npm install --omit=dev`` in the package, by the pinned npm
    (install scripts find the pinned ``node`` first on ``PATH``)."""
    if not (package / "package.json").is_file():
        return ""
    env = _tool_env(cache)
    env["PATH"] = f"{node_dist.RELEASES['20'].binary.parent}:{env['PATH']}"
    if Path(SYSTEM_CA_BUNDLE).is_file():  # official builds trust their own CA list only
        env["NODE_EXTRA_CA_CERTS"] = SYSTEM_CA_BUNDLE
    return _run([*node_dist.npm_command(), "install", "--omit=dev", "--no-audit", "--no-fund"], package,
                env, "npm install")


def go_binary(package: Path, handler: str, cache: Path) -> str:
    """Compile the package with a generated Runtime API wrapper into ``./bootstrap``."""
    if not any(package.glob("*.go")):
        raise BuildStepFailed("the package has no .go file at its root", "")
    wrapper = GO_WRAPPER.read_text().replace("HandlerFunctionName", handler)
    (package / "impuls_main.go").write_text(wrapper)
    if not (package / "go.mod").exists():
        (package / "go.mod").write_text("module function\n\ngo 1.19\n")
    log = _run(["go", "build", "-trimpath", "-ldflags=-s -w", "-o", "bootstrap", "."], package,
               _tool_env(cache), "go build")
    for path in [*package.glob("*.go"), package / "go.mod", package / "go.sum"]:
        path.unlink(missing_ok=True)  # sources are not needed at run time
    return log or "go build: ok\n"


def _dotnet_client(cache: Path, env: dict[str, str]) -> tuple[Path, str]:
    """Amazon.Lambda.Core.dll and impuls_bootstrap.exe, compiled once per version of their
    sources into the tool cache; returns their directory and the compile log."""
    sources = [DOTNET_DIR / "LambdaCore.cs", DOTNET_DIR / "Bootstrap.cs"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    done = cache / "dotnet" / digest
    if (done / DOTNET_CLIENT[-1]).is_file():
        return done, ""
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=done.parent))
    try:
        log = _run(["mcs", "-debug", "-target:library", f"-out:{DOTNET_CLIENT[0]}", f"-r:{NEWTONSOFT_JSON}",
                    str(sources[0])], tmp, env, "mcs (Amazon.Lambda.Core)")
        log += _run(["mcs", "-debug", f"-out:{DOTNET_CLIENT[1]}", f"-r:{NEWTONSOFT_JSON}",
                     f"-r:{DOTNET_CLIENT[0]}", str(sources[1])], tmp, env, "mcs (runtime client)")
        try:
            os.rename(tmp, done)
        except OSError:  # another build got there first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done, log


def dotnet_assembly(package: Path, handler: str, cache: Path) -> str:
    """Compile every ``*.cs`` of the package with Mono's ``mcs`` into ``<Assembly>.dll`` (the
    handler's first part), against the Lambda interfaces, Newtonsoft.Json and the ``*.dll`` at the
    package root; add the runtime client and a ``./bootstrap`` that starts it on Mono."""
    sources = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.cs"))
    if not sources:
        raise BuildStepFailed("the package has no .cs file", "")
    assembly = handler.split("::", 1)[0]
    env = _tool_env(cache)
    client, log = _dotnet_client(cache, env)
    for name in DOTNET_CLIENT:
        for suffix in ("", ".mdb"):
            shutil.copyfile(client / (name + suffix), package / (name + suffix))
    references = sorted(p.name for p in package.glob("*.dll") if p.name != f"{assembly}.dll")
    log += _run(["mcs", "-debug", "-target:library", f"-out:{assembly}.dll", f"-r:{NEWTONSOFT_JSON}",
                 *(f"-r:{name}" for name in (*DOTNET_REFERENCES, *references)), *sources],
                package, env, "mcs")
    (package / "bootstrap").write_text(DOTNET_BOOTSTRAP)
    (package / "bootstrap").chmod(0o755)
    return log


def provided_bootstrap(package: Path, handler: str, cache: Path) -> str:
    """A custom runtime needs an executable ``bootstrap`` at the package root."""
    bootstrap = package / "bootstrap"
    if not bootstrap.is_file():
        raise BuildStepFailed("the package has no 'bootstrap' file at its root "
                         "(a custom runtime starts ./bootstrap)", "")
    bootstrap.chmod(0o755)
    with open(bootstrap, "rb") as fh:
        head = fh.read(2)
    if head != b"#!" and head != b"\x7fE":
        return "warning: bootstrap is neither a script with #! nor an ELF binary\n"
    return ""

