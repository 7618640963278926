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
import zipfile
from pathlib import Path

from impuls.runtimes import node_dist

BUILD_TIMEOUT = 600
GO_WRAPPER = Path(__file__).resolve().parent / "go" / "impuls_main.go"
#: Debian's OpenJDK 17 (openjdk-17-jdk-headless), the same path on the host and in the guest
JAVA_HOME = Path("/usr/lib/jvm/java-17-openjdk-amd64")
#: Debian's Jackson (libjackson2-databind-java and its dependencies)
JACKSON_JARS = tuple(f"/usr/share/java/jackson-{name}.jar" for name in ("databind", "core", "annotations"))
#: the Java runtime client and Lambda's interfaces (com.amazonaws.services.lambda.runtime)
JAVA_CLIENT_SOURCES = Path(__file__).resolve().parent / "java"
#: where a built Java package holds its copy of the compiled client
JAVA_CLIENT_JAR = ".impuls/impuls-runtime.jar"

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


def java_client_jar(cache: Path) -> Path:
    """The Java runtime client, compiled once per content of its sources into the tool cache
    (``<cache>/java/impuls-runtime-<hash>.jar``); concurrent builds may both compile, one wins."""
    sources = sorted(JAVA_CLIENT_SOURCES.rglob("*.java"))
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.relative_to(JAVA_CLIENT_SOURCES)}\0".encode() + source.read_bytes())
    jar = cache / "java" / f"impuls-runtime-{digest.hexdigest()[:16]}.jar"
    if jar.is_file():
        return jar
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        classes = Path(tmp) / "classes"
        _run([str(JAVA_HOME / "bin" / "javac"), "--release", "17", "-encoding", "UTF-8", "-d", str(classes),
              "-cp", ":".join(JACKSON_JARS), *map(str, sources)], JAVA_CLIENT_SOURCES, _tool_env(cache),
             "javac (the Java runtime client)")
        staged = Path(tmp) / "client.jar"
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as out:
            for path in sorted(classes.rglob("*.class")):
                out.write(path, path.relative_to(classes).as_posix())
        os.replace(staged, jar)
    return jar


# The JVM is sized to the function: the heap takes half of memory_mb (metaspace, code cache,
# thread stacks and the class-data archive need the rest), one serial GC thread, C1 only and
# Debian's class-data sharing archive for a short cold start, no perf-data file.
JAVA_BOOTSTRAP = f"""#!/bin/sh
# Generated by Impuls at build time: starts the Java 17 runtime client (impuls.runtime.Main).
# The Runtime API socket is passed as an argument: the JVM cannot unset its own environment.
socket="${{IMPULS_RUNTIME_API_SOCKET:-}}"
unset IMPULS_RUNTIME_API_SOCKET
memory="${{AWS_LAMBDA_FUNCTION_MEMORY_SIZE:-128}}"
task="${{LAMBDA_TASK_ROOT:-$(pwd)}}"
exec {JAVA_HOME}/bin/java -Xmx$((memory / 2))m -Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \\
    -Xshare:auto -XX:-UsePerfData -Dfile.encoding=UTF-8 \\
    -cp "$task/{JAVA_CLIENT_JAR}:{':'.join(JACKSON_JARS)}:$task:$task/lib/*:$task/*" \\
    impuls.runtime.Main "$socket"
"""


def java_package(package: Path, handler: str, cache: Path) -> str:
    """A Java package (a jar's or zip's classes and ``lib/*.jar``, or ``*.java`` sources compiled
    here with javac against the client's Lambda interfaces, Jackson and ``lib/*.jar``) → the
    package plus the compiled client and a ``./bootstrap`` that starts it."""
    client = java_client_jar(cache)
    sources = sorted(package.rglob("*.java"))
    log = ""
    if sources:
        jars = [str(client), *JACKSON_JARS, *map(str, sorted(package.glob("lib/*.jar"))),
                *map(str, sorted(package.glob("*.jar")))]
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            argfile = Path(tmp) / "sources"
            quoted = (path.relative_to(package).as_posix().replace("\\", "\\\\").replace('"', '\\"')
                      for path in sources)  # javac's @argfile syntax
            argfile.write_text("".join(f'"{name}"\n' for name in quoted))
            log = _run([str(JAVA_HOME / "bin" / "javac"), "--release", "17", "-encoding", "UTF-8",
                        "-d", ".", "-cp", ":".join(jars), f"@{argfile}"], package, _tool_env(cache), "javac")
        for source in sources:
            source.unlink()  # classes are what runs
    elif not any(package.rglob("*.class")) and not any(package.rglob("*.jar")):
        raise BuildStepFailed("the package has no .class, .jar or .java file", "")
    (package / JAVA_CLIENT_JAR).parent.mkdir(exist_ok=True)
    shutil.copyfile(client, package / JAVA_CLIENT_JAR)
    (package / "bootstrap").write_text(JAVA_BOOTSTRAP)
    (package / "bootstrap").chmod(0o755)
    return log or "javac: no sources, the classes and jars as given\n"


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

