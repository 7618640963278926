"""The README's curl examples (including the original Impuls ones) run verbatim against a server:
once with the admin key the server wrote at its first start, once with authentication off."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

import pytest

from tests.helpers import ROOT, Server

KEY_LINE = "KEY=$(cat .impuls/admin-key)"


@pytest.mark.parametrize("auth", ["admin-key file", "--no-auth"])
def test_readme_curl_examples(make_server: Callable[..., Server], auth: str) -> None:
    if auth == "--no-auth":
        server = make_server(args=["--allow-local", "--no-auth"], env={"IMPULS_ADMIN_KEY": ""})
    else:
        server = make_server(args=["--allow-local"], env={"IMPULS_ADMIN_KEY": ""})
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## API examples", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```sh\n(.*?)```", section, re.S)
    assert script is not None and KEY_LINE in script.group(1)
    commands = script.group(1).replace("http://localhost:8080", server.url)
    if auth == "--no-auth":
        assert not (server.data_dir / "admin-key").exists()
        commands = commands.replace(KEY_LINE, "KEY=")
    else:
        commands = commands.replace(".impuls/admin-key", str(server.data_dir / "admin-key"))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", commands.replace("curl ", "curl -sS -f ")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    got = out.stdout.replace(" ", "")
    for expected in ('"body":{"statusCode":200,"body":"Hello from Impuls!"}',
                     '"name":"secret-function"', '"message":"Hello Ada"',
                     '"message":"Function deleted successfully"', '"status":"healthy"'):
        assert expected.replace(" ", "") in got, expected
