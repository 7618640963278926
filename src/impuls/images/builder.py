"""Builds the microVM guest images from Debian packages only: kernel, initramfs, a rootfs per runtime.

Each step is cached under a key of its inputs (``manifest.json``), so a build
with unchanged inputs does nothing.  Needs root (debootstrap), ``apt-get``,
``dpkg-deb``, ``mke2fs`` and ``lz4`` (the kernel's compression): all from
``scripts/setup``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from impuls.runtimes import RUNTIMES_DIR, build_steps, node_dist
from impuls.runtimes.guest import AGENT, INIT_SCRIPT, PROTOCOL
from impuls.runtimes.guest.protocol import (
    API_SOCKET,
    CODE_ROOT,
    CONFIG_PATH,
    GUEST_ROOT,
    SANDBOX_GID,
    SANDBOX_UID,
    SANDBOX_USER,
    TASK_ROOT,
)
from impuls.sandbox.microvm.images import GUEST_RUNTIMES, ImageStore, disk_usage

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# A step's key hashes its inputs: the resolved package versions (from the local apt
# cache; `apt-get update` only when a package is unknown), the Debian suite and mirror,
# the recipe versions below and the content of the guest files.  Changing the agent
# thus rebuilds only the root filesystems (seconds), not the debootstrap trees (a minute).
# Bump a recipe when its step changes in a way its other inputs do not show.
KERNEL_RECIPE = "1"
INITRAMFS_RECIPE = "1"
TREE_RECIPE = "1"
ROOTFS_RECIPE = "2"
MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "romfs")
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
        "var/cache/apt", "var/lib/apt/lists", "var/log", "var/cache/debconf")
APT_OPTS = ("-o", "APT::Sandbox::User=root", "-q")
# Whatever the umask: QEMU runs as its own unprivileged uid (sandbox/microvm/jail.py) and
# must read the kernel, the initramfs and the root filesystems (they hold nothing secret).
IMAGE_MODE = 0o644

Progress = Callable[[str], None]


class ImageBuildFailed(Exception):
    """A step failed; the message names the step and the tool's complaint."""


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def detect_mirror() -> str:
    """The host's own Debian mirror (first non-security ``deb`` URI), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                m = re.match(r"^\s*(?:deb|URIs:)\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
                if m and "security" not in m.group(1) and m.group(1).startswith("http"):
                    return m.group(1)
    return DEFAULT_MIRROR


class Builder:
    def __init__(self, store: ImageStore, progress: Progress | None = None, mirror: str | None = None,
                 suite: str = SUITE) -> None:
        self.store = store
        self.progress = progress or (lambda _line: None)
        self.mirror = mirror or detect_mirror()
        self.suite = suite
        self.log_path = store.root / "build.log"
        self._apt_updated = False
        self._apt_cache: dict[str, dict[str, str]] = {}

    # --- running tools ----------------------------------------------------------

    def _run(self, argv: Sequence[str], cwd: Path | None = None, what: str = "",
             on_line: Callable[[str], None] | None = None) -> str:
        """Run a tool, appending its output to build.log; ImageBuildFailed with its tail on failure."""
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            try:
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
                proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
            except OSError as exc:
                raise ImageBuildFailed(f"{what or argv[0]}: cannot run {argv[0]}: {exc}") from exc
            assert proc.stdout is not None
            lines: list[str] = []
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if on_line is not None:
                    on_line(line.rstrip())
            rc = proc.wait()
        out = "".join(lines)
        if rc != 0:
            tail = "".join(lines[-15:]).strip()
            raise ImageBuildFailed(f"{what or argv[0]} failed (exit {rc}); see {self.log_path}:\n{tail}")
        return out

    def _apt_show(self, package: str) -> dict[str, str]:
        """The candidate version's control fields, from the local apt cache (updated once if unknown)."""
        if package in self._apt_cache:
            return self._apt_cache[package]
        for attempt in range(2):
            out = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True,
                                 text=True, check=False, env={**os.environ, "LC_ALL": "C"})
            if out.returncode == 0 and out.stdout.strip():
                fields: dict[str, str] = {}
                for line in out.stdout.splitlines():
                    if ":" in line and not line.startswith(" "):
                        name, _, value = line.partition(":")
                        fields.setdefault(name.strip(), value.strip())
                self._apt_cache[package] = fields
                return fields
            if attempt == 0 and not self._apt_updated:
                self.progress("  apt-get update (package lists are missing or stale)")
                self._run(["apt-get", *APT_OPTS, "update"], what="apt-get update")
                self._apt_updated = True
        raise ImageBuildFailed(f"package {package} is unknown to apt (check the Debian sources)")

    def _download(self, package: str, version: str) -> Path:
        downloads = self.store.cache / "debs"
        downloads.mkdir(parents=True, exist_ok=True)

        def find() -> Path | None:  # apt writes the epoch's ':' as %3a
            for path in downloads.glob(f"{package}_*.deb"):
                if unquote(path.name).split("_")[1] == version:
                    return path
            return None

        found = find()
        if found is None:
            self._run(["apt-get", *APT_OPTS, "download", f"{package}={version}"], cwd=downloads,
                      what=f"download {package}")
            found = find()
        if found is None:
            raise ImageBuildFailed(f"apt-get download {package}={version} left no .deb in {downloads}")
        return found

    # --- the build ----------------------------------------------------------------

    def build(self, runtimes: Iterable[str] | None = None, force: bool = False) -> BuildReport:
        wanted = list(runtimes or GUEST_RUNTIMES)
        for name in wanted:
            if name not in GUEST_RUNTIMES:
                raise ImageBuildFailed(
                    f"unknown guest runtime {name!r}; choose from {', '.join(GUEST_RUNTIMES)}")
        report = BuildReport()
        started = time.monotonic()
        self.store.root.mkdir(parents=True, exist_ok=True)
        with self.store.lock():
            self._step("kernel", report, force, self._kernel_key, self._build_kernel)
            self._step("initramfs", report, force, self._initramfs_key, self._build_initramfs)
            for name in wanted:
                self._step(f"rootfs-{name}", report, force, functools.partial(self._rootfs_key, name),
                           functools.partial(self._build_rootfs, name))
            stale = self.store.collect_snapshots()
            if stale:
                self.progress(f"removed {stale} snapshots of the images replaced")
        report.seconds = time.monotonic() - started
        return report

    def _step(self, name: str, report: BuildReport, force: bool, key_of: Callable[[], str],
              make: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
        key = key_of()
        current = self.store.artifact(name)
        if current is not None and current.key == key and not force:
            self.progress(f"{name}: up to date ({_size(current.size)})")
            report.cached.append(name)
            return
        t0 = time.monotonic()
        self.progress(f"{name}: building")
        path, info = make(key)
        self.store.record(name, path, key, _now(), info)
        self.progress(f"{name}: built in {time.monotonic() - t0:.1f} s ({_size(path.stat().st_size)})")
        report.built.append(name)

    # kernel: Debian's cloud kernel (linux-image-cloud-amd64 → the versioned package),
    # its vmlinuz unpacked to the uncompressed ELF vmlinux, which has the PVH entry note:
    # QEMU boots it directly, without real-mode set-up or decompression.

    def _kernel_package(self) -> tuple[str, str]:
        meta = self._apt_show(KERNEL_META_PACKAGE)
        m = re.search(r"(linux-image-[0-9][^\s,]*)\s*\(=\s*([^)]+)\)", meta.get("Depends", ""))
        if not m:
            raise ImageBuildFailed(
                f"{KERNEL_META_PACKAGE} does not name a kernel package: {meta.get('Depends')}")
        return m.group(1), m.group(2).strip()

    def _kernel_key(self) -> str:
        package, version = self._kernel_package()
        return _sha("kernel", KERNEL_RECIPE, package, version)

    def _kernel_files(self) -> Path:
        """The unpacked kernel package (cached): boot/vmlinuz-*, lib/modules/*."""
        package, version = self._kernel_package()
        target = self.store.cache / f"kernel-{package}-{version}"
        if target.is_dir():
            return target
        deb = self._download(package, version)
        tmp = Path(tempfile.mkdtemp(prefix=".kernel-", dir=self.store.cache))
        self._run(["dpkg-deb", "-x", str(deb), str(tmp)], what="unpack the kernel package")
        os.replace(tmp, target)
        return target

    def _build_kernel(self, key: str) -> tuple[Path, dict[str, Any]]:
        package, version = self._kernel_package()
        files = self._kernel_files()
        vmlinuz = next((files / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise ImageBuildFailed(f"{package} has no boot/vmlinuz-*")
        self.progress(f"  extracting vmlinux from {vmlinuz.name}")
        image = extract_vmlinux(vmlinuz.read_bytes())
        if not has_pvh_note(image):
            raise ImageBuildFailed(
                f"{vmlinuz.name}: no PVH entry note; QEMU cannot boot this kernel directly")
        out = self.store.kernel
        _write_atomic(out, image)
        return out, {"package": package, "version": version, "release": vmlinuz.name[len("vmlinuz-"):]}

    # initramfs: static busybox (busybox-static), the virtio modules the cloud kernel
    # builds as modules (with their dependencies, in load order) and runtimes/guest/init.sh;
    # an uncompressed newc cpio (nothing to inflate under emulation).

    def _initramfs_key(self) -> str:
        busybox = self._apt_show("busybox-static")["Version"]
        return _sha("initramfs", INITRAMFS_RECIPE, self._kernel_key(), busybox, ",".join(MODULES),
                    INIT_SCRIPT.read_bytes())

    def _build_initramfs(self, key: str) -> tuple[Path, dict[str, Any]]:
        version = self._apt_show("busybox-static")["Version"]
        deb = self._download("busybox-static", version)
        with tempfile.TemporaryDirectory(dir=self.store.cache) as tmp:
            self._run(["dpkg-deb", "-x", str(deb), tmp], what="unpack busybox-static")
            busybox = (Path(tmp) / "bin" / "busybox").read_bytes()
        modules_root = next((self._kernel_files() / "lib" / "modules").iterdir())
        order = module_load_order(modules_root, MODULES)
        archive = CpioWriter()
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
            archive.directory(d)
        archive.device("dev/console", 5, 1)
        archive.file("bin/busybox", busybox, 0o755)
        for applet in ("sh", "mount", "umount", "insmod", "sleep", "switch_root", "echo", "cat", "poweroff"):
            archive.symlink(f"bin/{applet}", "busybox")
        for name, path in order:
            archive.file(f"lib/modules/{name}.ko", path.read_bytes(), 0o644)
        archive.file("lib/modules/load-order", ("\n".join(n for n, _ in order) + "\n").encode(), 0o644)
        archive.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        out = self.store.initramfs
        _write_atomic(out, archive.finish())
        return out, {"busybox": version, "modules": [n for n, _ in order]}

    # rootfs, per guest runtime: a debootstrap --variant=minbase tree with the runtime's
    # packages, trimmed (docs, locales, apt caches), plus the sandbox user (cached in
    # cache/trees); then the tree plus the agent, its protocol and the runtime clients
    # (/opt/impuls), packed by mke2fs -d into an ext4 image without journal (it is
    # mounted read-only).

    def _tree_key(self, runtime: str) -> str:
        return _sha("tree", TREE_RECIPE, self.suite, self.mirror, *GUEST_RUNTIMES[runtime].packages, *TRIM)

    def _guest_files(self, runtime: str) -> dict[str, tuple[bytes, int]]:
        """Files /opt/impuls holds in the ``runtime`` rootfs: path → (content, mode)."""
        files: dict[str, tuple[bytes, int]] = {
            "agent.py": (AGENT.read_bytes(), 0o755),
            "protocol.py": (PROTOCOL.read_bytes(), 0o644),  # imported by the agent, from its directory
            "python/bootstrap.py": ((RUNTIMES_DIR / "python" / "bootstrap.py").read_bytes(), 0o644),
        }
        if runtime == "nodejs":
            files["nodejs/bootstrap.js"] = ((RUNTIMES_DIR / "nodejs" / "bootstrap.js").read_bytes(), 0o644)
        if runtime == "ruby":
            files["ruby/bootstrap.rb"] = ((RUNTIMES_DIR / "ruby" / "bootstrap.rb").read_bytes(), 0o644)
        return files

    def _rootfs_key(self, runtime: str) -> str:
        parts: list[str | bytes] = ["rootfs", ROOTFS_RECIPE, self._tree_key(runtime)]
        for path, (content, mode) in sorted(self._guest_files(runtime).items()):
            parts += [path, str(mode), content]
        for release in _guest_releases(runtime):
            parts += [release.package, release.version, release.integrity]
        return _sha(*parts)

    def _tree(self, runtime: str) -> Path:
        """The trimmed debootstrap tree of ``runtime`` (cached by its key)."""
        key = self._tree_key(runtime)[:16]
        trees = self.store.cache / "trees"
        target = trees / f"{runtime}-{key}"
        if (target / ".complete").exists():
            self.progress(f"  debootstrap tree {target.name}: cached")
            return target
        trees.mkdir(parents=True, exist_ok=True)
        for old in trees.glob(f"{runtime}-*"):
            shutil.rmtree(old, ignore_errors=True)
        if os.geteuid() != 0:
            raise ImageBuildFailed("building a root filesystem runs debootstrap, which needs root")
        if shutil.which("debootstrap") is None:
            raise ImageBuildFailed("debootstrap is not installed (apt-get install debootstrap)")
        packages = GUEST_RUNTIMES[runtime].packages
        self.progress(f"  debootstrap {self.suite} minbase + {', '.join(packages)} from {self.mirror} "
                      "(about a minute)")
        debs = self.store.cache / "debootstrap"
        debs.mkdir(parents=True, exist_ok=True)
        tmp = trees / f".{runtime}-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        last = [time.monotonic()]

        def on_line(line: str) -> None:
            if line.startswith("I: ") and time.monotonic() - last[0] > 5:
                last[0] = time.monotonic()
                self.progress(f"  debootstrap: {line[3:]}")

        self._run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                   f"--cache-dir={debs.resolve()}", self.suite, str(tmp), self.mirror],
                  what=f"debootstrap ({runtime})", on_line=on_line)
        for rel in TRIM:
            for child in (tmp / rel).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        _add_sandbox_user(tmp)
        (tmp / ".complete").write_text(_now())
        os.replace(tmp, target)
        return target

    def _build_rootfs(self, runtime: str, key: str) -> tuple[Path, dict[str, Any]]:
        tree = self._tree(runtime)
        opt = tree / GUEST_ROOT.lstrip("/")
        shutil.rmtree(opt, ignore_errors=True)
        for rel, (content, mode) in self._guest_files(runtime).items():
            dest = opt / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
            dest.chmod(mode)
        for release in _guest_releases(runtime):  # at the host's path, which the runtime names
            if not node_dist.installed(release):
                raise ImageBuildFailed(f"{release.binary} is missing: run scripts/setup")
            dest = tree / str(release.home).lstrip("/")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(release.home, dest)
        versions, runtime_ids = _runtime_versions(tree, runtime)
        config = {"runtime": runtime, "runtime_ids": runtime_ids, "versions": versions}
        (tree / CONFIG_PATH.lstrip("/")).write_text(json.dumps(config) + "\n")
        for d in (TASK_ROOT, CODE_ROOT, os.path.dirname(API_SOCKET)):
            (tree / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        out = self.store.rootfs(runtime)
        used = disk_usage(tree)
        inodes = sum(len(dirs) + len(files) for _, dirs, files in os.walk(tree))
        size_mb = int(used * 1.15 / 2**20) + 48
        tmp = out.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        self.progress(f"  mke2fs: {_size(used)} of files into a {size_mb} MB ext4 image")
        self._run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
                   "-N", str(inodes + inodes // 4 + 1024), "-L", f"impuls-{runtime}", "-E", "root_owner=0:0",
                   "-d", str(tree), str(tmp), f"{size_mb}M"], what=f"mke2fs ({runtime})")
        tmp.chmod(IMAGE_MODE)
        os.replace(tmp, out)
        return out, config


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(IMAGE_MODE)
    os.replace(tmp, path)


def _add_sandbox_user(tree: Path) -> None:
    passwd, group = tree / "etc" / "passwd", tree / "etc" / "group"
    if f"\n{SANDBOX_USER}:" not in "\n" + passwd.read_text():
        with open(passwd, "a") as fh:
            fh.write(f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}::/tmp:/usr/sbin/nologin\n")
    if f"\n{SANDBOX_USER}:" not in "\n" + group.read_text():
        with open(group, "a") as fh:
            fh.write(f"{SANDBOX_USER}:x:{SANDBOX_GID}:\n")


def _dpkg_version(tree: Path, package: str) -> str:
    status = (tree / "var" / "lib" / "dpkg" / "status").read_text()
    for stanza in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.M):
            m = re.search(r"^Version: (\S+)$", stanza, re.M)
            if m:
                return m.group(1)
    return ""


def _runtime_versions(tree: Path, runtime: str) -> tuple[dict[str, str], list[str]]:
    """Language versions in the tree and the runtime ids the rootfs can serve."""
    versions: dict[str, str] = {}
    ids: list[str] = []
    python = os.readlink(tree / "usr" / "bin" / "python3") if (tree / "usr/bin/python3").is_symlink() else ""
    m = re.match(r"python(3\.\d+)$", python)
    if m:
        versions["python"] = _dpkg_version(tree, f"python{m.group(1)}").split("-")[0] or m.group(1)
        if runtime == "python":
            ids.append(f"python{m.group(1)}")
    for release in _guest_releases(runtime):
        versions[f"nodejs{release.major}"] = release.version
        ids.append(f"nodejs{release.major}")
    java = tree / str(build_steps.JAVA_HOME / "bin" / "java").lstrip("/")
    if runtime == "java" and java.exists() and all((tree / jar.lstrip("/")).exists()
                                                  for jar in build_steps.JACKSON_JARS):
        versions["java17"] = _dpkg_version(tree, "openjdk-17-jre-headless")
        ids.append("java17")  # packages are built on the host into a ./bootstrap that starts java
    ruby = sorted((tree / "usr" / "bin").glob("ruby[0-9].[0-9]*")) if runtime == "ruby" else []
    if ruby:  # Debian's /usr/bin/ruby3.1, the interpreter the ruby3.1 runtime names
        minor = ruby[-1].name.removeprefix("ruby")
        versions["ruby"] = _dpkg_version(tree, f"ruby{minor}").split("-")[0] or minor
        ids.append(f"ruby{minor}")
    if runtime == "dotnet" and (tree / "usr" / "bin" / "mono").exists():
        versions["mono"] = _dpkg_version(tree, "mono-runtime").split("+")[0]
        ids.append("dotnet-mono")
    return versions, ids


def _guest_releases(runtime: str) -> list[node_dist.Release]:
    """The pinned Node.js builds a rootfs carries (the nodejs one: every major Impuls offers)."""
    return list(node_dist.RELEASES.values()) if runtime == "nodejs" else []


# --- kernel image helpers ------------------------------------------------------------

_COMPRESSION_MAGIC = (
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b\x08", "gzip"),
)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage (its payload compressed with lz4, xz, zstd or gzip)."""
    for magic, kind in _COMPRESSION_MAGIC:
        start = vmlinuz.find(magic)
        while start >= 0:
            data = _decompress(kind, vmlinuz[start:])
            if data[:4] == b"\x7fELF":
                return data
            start = vmlinuz.find(magic, start + 1)
    raise ImageBuildFailed("no known compressed ELF payload found in vmlinuz")


def _decompress(kind: str, data: bytes) -> bytes:
    try:
        if kind == "gzip":
            return gzip.GzipFile(fileobj=io.BytesIO(data)).read()
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(data)
    except (OSError, EOFError, lzma.LZMAError):
        return b""
    tool = shutil.which(kind)
    if tool is None:
        raise ImageBuildFailed(f"the kernel is {kind}-compressed and the '{kind}' tool is not installed")
    proc = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=False)
    return proc.stdout  # trailing bytes after the payload make the tool complain: judge by the output


def has_pvh_note(elf: bytes) -> bool:
    """True when an ELF64 PT_NOTE holds the Xen PVH entry point (type 18, name "Xen")."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        header = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        p_type, p_offset, p_filesz = header[0], header[2], header[5]
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _modinfo_depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def module_load_order(modules_root: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``wanted`` modules and their dependencies, dependencies first; built-ins are skipped."""
    index: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko"):
        index[path.stem.replace("-", "_")] = path
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:  # built into the kernel
            return
        for dep in _modinfo_depends(path.read_bytes()):
            visit(dep)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


class CpioWriter:
    """A newc (SVR4, no CRC) cpio archive, as the kernel's initramfs unpacker reads it."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self._entry("TRAILER!!!", 0)
        data = self.out.getvalue()
        return data + b"\0" * (-len(data) % 512)
