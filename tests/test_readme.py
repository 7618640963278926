"""The README's curl examples (including the original Impuls ones) run verbatim against a server."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

from tests.helpers import ROOT, Server


def test_readme_curl_examples(make_server: Callable[..., Server]) -> None:
    server = make_server(args=["--allow-local"])
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## API examples", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```sh\n(.*?)```", section, re.S)
    assert script is not None
    commands = script.group(1).replace("http://localhost:8080", server.url)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", commands.replace("curl ", "curl -sS -f ")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    got = out.stdout.replace(" ", "")
    for expected in ('"body":{"statusCode":200,"body":"Hello from Impuls!"}',
                     '"name":"secret-function"', '"message":"Hello Ada"',
                     '"message":"Function deleted successfully"', '"status":"healthy"'):
        assert expected.replace(" ", "") in got, expected
