"""Code disks: a function version's code as a small read-only disk for the microVM guest,
made once per code version (keyed by the content-addressed code directory) and cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import marshal
import os
import secrets
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from impuls.runtimes.guest.protocol import TASK_ROOT
from impuls.sandbox.microvm.jail import give_to_qemu

# Every code disk is a sparse file of exactly CODE_DISK_BYTES holding:
# * an MBR whose single partition spans PARTITION_OFFSET .. end.  Every code disk, and the
#   blank disk of snapshot templates, has this same sector 0, so the only block a restored
#   guest kernel cached from the template's disk while booting (the partition scan) is
#   still right.
# * in the partition, a romfs (Documentation/filesystems/romfs.rst) with two directories:
#   TASK_DIR, the code, which the guest bind-mounts at /var/task, and PYCACHE_DIR: for
#   Python, unchecked-hash pycs (PEP 552) compiled on the host when its interpreter's minor
#   version is the guest's, laid out like the code (pycache/<dir>/<module>.cpython-3XX.pyc).
#   The guest's preloaded Python client loads them for modules under /var/task (compiling
#   under TCG emulation costs far more), so the function's own directory stays exactly
#   what it shipped.
# romfs, because mounting it runs a few hundred bytes of kernel code, where ext4's mount
# costs ~100 ms of freshly translated code under TCG after each restore, and because its
# first two 1 KiB blocks can be made identical for every image: superblock, root
# directory, and the headers of `task` and `pycache` at fixed offsets.  The snapshot
# template mounts its blank disk at boot, reading only those two blocks; a clone restored
# with another disk then finds its own code behind the already-mounted filesystem, with
# nothing stale cached and nothing to mount.  romfs has no owners or times (everything is
# root's, 0644/0755), which suits read-only code.  A package romfs cannot hold (a name over
# MAX_ROMFS_NAME bytes) becomes an ext4 image instead, which the agent mounts over
# /var/task after the restore.
CODE_DISK_BYTES = 512 * 2**20
PARTITION_OFFSET = 2**20
MAX_ROMFS_NAME = 127
TASK_DIR = "task"
PYCACHE_DIR = "pycache"


class CodeDiskError(Exception):
    pass


@dataclass(frozen=True)
class CodeDisk:
    path: Path
    fstype: str  # "romfs" | "ext4"


def mbr() -> bytes:
    """A DOS partition table with one Linux partition from 1 MiB to the end of the disk."""
    first = PARTITION_OFFSET // 512
    count = CODE_DISK_BYTES // 512 - first
    entry = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", first, count)
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


# --- romfs ----------------------------------------------------------------------------

_HARDLINK, _DIR, _REG, _SYMLINK = 0, 1, 2, 3
_EXEC = 8
ROMFS_VOLUME = "impuls-code"
ROMFS_DECLARED_SIZE = CODE_DISK_BYTES - PARTITION_OFFSET
# The fixed part: block 0 = superblock + root; block 1 = the root's entries;
# then the "." and ".." of both directories.  Everything else follows _FREE.
_ROOT = 32
_ROOT_DOT, _ROOT_DOTDOT, _PYCACHE, _TASK = 1024, 1056, 1088, 1120
_PYCACHE_DOT, _PYCACHE_DOTDOT, _TASK_DOT, _TASK_DOTDOT = 2048, 2080, 2112, 2144
_FREE = 2176


def _pad16(n: int) -> int:
    return (n + 15) & ~15


def _checksum_fix(data: bytearray, checksum_at: int, length: int) -> None:
    """Set the be32 at ``checksum_at`` so that the be32 words of data[:length] sum to 0."""
    struct.pack_into(">I", data, checksum_at, 0)
    total = sum(struct.unpack_from(f">{length // 4}I", data, 0)) & 0xFFFFFFFF
    struct.pack_into(">I", data, checksum_at, (-total) & 0xFFFFFFFF)


@dataclass
class _Node:
    name: str
    kind: int
    data: bytes = b""
    source: Path | None = None  # a regular file's content, read while writing
    size: int = 0
    executable: bool = False
    children: list[_Node] = field(default_factory=list)
    offset: int = 0
    next: int = 0
    spec: int = 0

    @property
    def length(self) -> int:
        return self.size if self.source is not None else len(self.data)

    @property
    def header_size(self) -> int:
        return _pad16(16 + len(self.name.encode()) + 1)


def write_romfs(task: list[_Node], pycache: list[_Node], out: Path) -> int:
    """Write the two-directory romfs (see the layout above); returns the bytes used."""
    nodes: list[_Node] = []

    def fixed(name: str, kind: int, offset: int, spec: int, nxt: int = 0) -> _Node:
        node = _Node(name, kind, offset=offset, spec=spec, next=nxt)
        nodes.append(node)
        return node

    fixed(".", _DIR, _ROOT, _ROOT_DOT)
    fixed(".", _HARDLINK, _ROOT_DOT, _ROOT, _ROOT_DOTDOT)
    fixed("..", _HARDLINK, _ROOT_DOTDOT, _ROOT, _PYCACHE)
    fixed(PYCACHE_DIR, _DIR, _PYCACHE, _PYCACHE_DOT, _TASK)
    fixed(TASK_DIR, _DIR, _TASK, _TASK_DOT)
    free = _FREE

    def place_children(children: list[_Node], parent: int) -> int:
        """Offsets for ``children`` (depth first); returns the first one's (0: none)."""
        nonlocal free
        for child in children:
            child.offset = free
            free += child.header_size + _pad16(child.length)
            nodes.append(child)
            if child.kind == _DIR:
                dot = _Node(".", _HARDLINK, offset=free, spec=child.offset)
                dotdot = _Node("..", _HARDLINK, offset=free + 32, spec=parent)
                free += 64
                nodes.extend((dot, dotdot))
                child.spec = dot.offset
                dot.next = dotdot.offset
                dotdot.next = place_children(child.children, child.offset)
        for a, b in itertools.pairwise(children):
            a.next = b.offset
        return children[0].offset if children else 0

    fixed(".", _HARDLINK, _PYCACHE_DOT, _PYCACHE, _PYCACHE_DOTDOT)
    fixed("..", _HARDLINK, _PYCACHE_DOTDOT, _ROOT, place_children(pycache, _PYCACHE))
    fixed(".", _HARDLINK, _TASK_DOT, _TASK, _TASK_DOTDOT)
    fixed("..", _HARDLINK, _TASK_DOTDOT, _ROOT, place_children(task, _TASK))

    nodes.sort(key=lambda n: n.offset)
    with open(out, "wb") as fh:
        head = bytearray(_ROOT)
        struct.pack_into(">8sII", head, 0, b"-rom1fs-", ROMFS_DECLARED_SIZE, 0)
        head[16:16 + len(ROMFS_VOLUME)] = ROMFS_VOLUME.encode()
        fh.write(head)
        for node in nodes:
            if fh.tell() < node.offset:
                fh.write(bytes(node.offset - fh.tell()))
            _write_node(fh, node)
        if fh.tell() < _FREE:
            fh.write(bytes(_FREE - fh.tell()))
    with open(out, "r+b") as image:  # the first 512 bytes must sum to zero
        first = bytearray(image.read(512))
        _checksum_fix(first, 12, 512)
        image.seek(12)
        image.write(first[12:16])
    return max(free, _FREE)


def _write_node(fh: BinaryIO, node: _Node) -> None:
    write = fh.write
    name = node.name.encode()
    meta = bytearray(node.header_size)
    kind = node.kind | (_EXEC if node.executable or node.kind == _DIR else 0)
    struct.pack_into(">IIII", meta, 0, node.next | kind, node.spec, node.length, 0)
    meta[16:16 + len(name)] = name
    _checksum_fix(meta, 12, len(meta))
    write(meta)
    written = 0
    if node.source is not None:
        with open(node.source, "rb") as src:
            while written < node.size and (chunk := src.read(min(1 << 20, node.size - written))):
                write(chunk)
                written += len(chunk)
        if written != node.size:
            raise CodeDiskError(f"{node.source} changed while the code disk was written")
    else:
        write(node.data)
        written = len(node.data)
    write(bytes(_pad16(written) - written))


def _scan(code_dir: Path) -> list[_Node]:
    """The code directory as romfs nodes, names sorted."""
    children: list[_Node] = []
    for name in sorted(os.listdir(code_dir)):
        if len(name.encode()) > MAX_ROMFS_NAME:
            raise CodeDiskError(f"name too long for romfs: {name[:40]}...")
        full = code_dir / name
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            children.append(_Node(name, _SYMLINK, os.readlink(full).encode()))
        elif stat.S_ISDIR(st.st_mode):
            children.append(_Node(name, _DIR, children=_scan(full)))
        elif stat.S_ISREG(st.st_mode):
            children.append(_Node(name, _REG, source=full, size=st.st_size,
                                  executable=bool(st.st_mode & 0o111)))
    return children


def _pyc_tree(pycs: dict[str, bytes]) -> list[_Node]:
    """``{"a/b.cpython-311.pyc": data}`` as romfs nodes."""
    root: dict[str, object] = {}
    for rel, data in pycs.items():
        parts = rel.split("/")
        level = root
        for part in parts[:-1]:
            level = level.setdefault(part, {})  # type: ignore[assignment]
        level[parts[-1]] = data

    def nodes(level: dict[str, object]) -> list[_Node]:
        out = []
        for name in sorted(level):
            value = level[name]
            if isinstance(value, dict):
                out.append(_Node(name, _DIR, children=nodes(value)))
            else:
                assert isinstance(value, bytes)
                out.append(_Node(name, _REG, value))
        return out

    return nodes(root)


# --- pyc ---------------------------------------------------------------------------------


def compile_pycs(code_dir: Path, guest_python: str) -> dict[str, bytes]:
    """``dir/module.cpython-3XX.pyc`` → unchecked-hash pyc, for every .py file that compiles.

    Empty when the host interpreter's ``major.minor`` differs from ``guest_python``'s.
    """
    if ".".join(guest_python.split(".")[:2]) != f"{sys.version_info.major}.{sys.version_info.minor}":
        return {}
    tag = sys.implementation.cache_tag
    out: dict[str, bytes] = {}
    for rel in _python_files(code_dir):
        try:
            source = (code_dir / rel).read_bytes()
            code = compile(source, f"{TASK_ROOT}/{rel}", "exec", dont_inherit=True)
            pyc = bytearray(importlib.util.MAGIC_NUMBER)
            pyc += (0b01).to_bytes(4, "little")  # hash-based, not checked against the source
            pyc += importlib.util.source_hash(source)
            pyc += marshal.dumps(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):
            continue
        out[f"{rel[:-3]}.{tag}.pyc"] = bytes(pyc)
    return out


def _python_files(code_dir: Path) -> Iterator[str]:
    for base, dirs, files in os.walk(code_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(base, name), code_dir)


# --- the cache ------------------------------------------------------------------------------


class CodeDisks:
    """``<dir>/<key>.<fstype>.img``: one code disk per code version, made once.

    The directory is the server's alone (0700); each disk is root:994 0640, readable by QEMU's
    uid (it is bound into QEMU's jail by file, see :mod:`.jail`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def key(code_dir: Path, extra: str = "") -> str:
        h = hashlib.sha256(f"{code_dir.resolve()}\0{extra}\0".encode())
        for base, dirs, files in sorted(os.walk(code_dir)):
            dirs.sort()
            for name in sorted(files):
                st = os.lstat(os.path.join(base, name))
                h.update(f"{os.path.relpath(os.path.join(base, name), code_dir)}\0{st.st_size}\0"
                         f"{st.st_mtime_ns}\0{st.st_mode}\0".encode())
        return h.hexdigest()[:32]

    def disk_for(self, code_dir: Path, guest_python: str = "") -> CodeDisk:
        """The code disk of ``code_dir`` (pycs compiled when ``guest_python`` is given)."""
        key = self.key(code_dir, guest_python)
        for fstype in ("romfs", "ext4"):
            target = self.root / f"{key}.{fstype}.img"
            if target.exists():
                with contextlib.suppress(OSError):
                    os.utime(target)
                return CodeDisk(target, fstype)
        unique = f"{os.getpid()}-{secrets.token_hex(4)}"  # threads may make the same disk at once
        tmp = self.root / f".{key}.{unique}.tmp"
        part = self.root / f".{key}.{unique}.part"
        try:
            try:
                pycs = compile_pycs(code_dir, guest_python) if guest_python else {}
                size = write_romfs(_scan(code_dir), _pyc_tree(pycs), part)
                fstype = "romfs"
            except CodeDiskError:
                size = self._ext4(code_dir, part)
                fstype = "ext4"
            if PARTITION_OFFSET + size > CODE_DISK_BYTES:
                raise CodeDiskError(f"the code ({size // 2**20} MB as {fstype}) does not fit a code disk")
            self._assemble(part, tmp)
            give_to_qemu(tmp)  # root:994 0640: QEMU's uid reads it, other users do not
            target = self.root / f"{key}.{fstype}.img"
            os.replace(tmp, target)
            return CodeDisk(target, fstype)
        finally:
            tmp.unlink(missing_ok=True)
            part.unlink(missing_ok=True)

    @staticmethod
    def _assemble(partition: Path, out: Path) -> None:
        """A disk: the partition table, then ``partition``'s content at 1 MiB, sparse to full size."""
        with open(out, "wb") as fh:
            fh.write(mbr())
            fh.seek(PARTITION_OFFSET)
            with open(partition, "rb") as src:
                while chunk := src.read(1 << 20):
                    fh.write(chunk)
            fh.truncate(CODE_DISK_BYTES)

    @staticmethod
    def _ext4(code_dir: Path, out: Path) -> int:
        used, inodes = 0, 0
        for base, dirs, files in os.walk(code_dir):
            inodes += len(dirs) + len(files)
            used += sum(os.lstat(os.path.join(base, f)).st_size + 4096 for f in files)
        size_mb = max(8, used * 5 // 4 // 2**20 + 4)
        proc = subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-N", str(inodes + 64),
             "-E", "root_owner=0:0", "-d", str(code_dir), str(out), f"{size_mb}M"],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CodeDiskError(f"mke2fs: {proc.stderr.strip() or proc.stdout.strip()}")
        return out.stat().st_size

    def blank(self) -> Path:
        """The code disk of snapshot templates: empty ``task`` and ``pycache``."""
        target = self.root / "blank.img"
        if not target.exists():
            unique = f"{os.getpid()}-{secrets.token_hex(4)}"
            tmp = self.root / f".blank.{unique}.tmp"
            part = self.root / f".blank.{unique}.part"
            try:
                write_romfs([], [], part)
                self._assemble(part, tmp)
                give_to_qemu(tmp)
                os.replace(tmp, target)
            finally:
                part.unlink(missing_ok=True)
                tmp.unlink(missing_ok=True)
        return target

    def collect(self, max_age_days: float = 7.0) -> int:
        """Remove disks no instance was created from for ``max_age_days``."""
        cutoff = time.time() - max_age_days * 86400
        removed = 0
        for path in self.root.glob("*.img"):
            with contextlib.suppress(OSError):
                if path.name != "blank.img" and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
