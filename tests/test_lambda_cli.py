"""The Lambda door through the AWS CLI v1: ``aws lambda ... --endpoint-url``, JSON output parsed.

The CLI runs as a child process with only the credentials of a key made for the test in its
environment; its config and credentials files point at files that do not exist, so nothing
of the host's AWS setup takes part.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, unique
from tests.lambda_fixtures import (
    HANDLER,
    PYTHON,
    REGION,
    ROLE,
    Credentials,
    code_sha256,
    function_arn,
    make_credentials,
    python_zip,
)

AWS = Path(sys.executable).with_name("aws")

SOURCE = """
import os
VALUE = {value!r}

def lambda_handler(event, context):
    if event.get("print"):
        print(event["print"])
    if event.get("fail"):
        raise RuntimeError(event["fail"])
    return {{"value": VALUE, "event": event, "greeting": os.environ.get("GREETING"),
            "memory": int(context.memory_limit_in_mb)}}
"""


def package(value: str) -> bytes:
    return python_zip(SOURCE.format(value=value))


class Cli:
    """``aws lambda`` against one server, with one key's credentials (or others given)."""

    def __init__(self, server: Server, creds: Credentials, home: Path) -> None:
        self.server = server
        self.creds = creds
        self.home = home

    def run(self, *args: str, creds: Credentials | None = None, check: bool = True,
            access_key_id: str | None = None, secret: str | None = None) -> subprocess.CompletedProcess[str]:
        creds = creds or self.creds
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "AWS_ACCESS_KEY_ID": access_key_id or creds.access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret or creds.secret_access_key,
            "AWS_CONFIG_FILE": str(self.home / "no-such-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.home / "no-such-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "1",
            "HOME": str(self.home),
        })
        cmd = [str(AWS), "lambda", *args, "--endpoint-url", self.server.url, "--region", REGION,
               "--output", "json"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False,
                              cwd=self.home)
        if check:
            assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr}"
        return done

    def json(self, *args: str, **kw: Any) -> Any:
        out = self.run(*args, **kw).stdout
        return json.loads(out) if out.strip() else None

    def create(self, name: str, archive: Path, *extra: str) -> dict[str, Any]:
        return dict(self.json("create-function", "--function-name", name, "--runtime", PYTHON,
                              "--role", ROLE, "--handler", HANDLER, "--zip-file", f"fileb://{archive}",
                              *extra))


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    assert AWS.exists(), f"the AWS CLI is not installed next to {sys.executable}"
    server = Server(tmp_path_factory.mktemp("lambda-cli") / "data").start()
    yield Cli(server, make_credentials(server, "deploy"), tmp_path_factory.mktemp("cli-home"))
    server.stop()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_create_wait_and_invoke(cli: Cli, tmp_path: Path) -> None:
    name = unique("cli")
    archive = write(tmp_path / "function.zip", package("one"))
    created = cli.create(name, archive, "--environment", "Variables={GREETING=from-cli}", "--memory-size",
                         "256", "--timeout", "10", "--description", "made by the aws cli", "--tags",
                         "team=cli")
    assert created["FunctionName"] == name and created["FunctionArn"] == function_arn(name), created
    assert created["Runtime"] == PYTHON and created["Handler"] == HANDLER and created["Role"] == ROLE
    assert created["CodeSha256"] == code_sha256(archive.read_bytes()), created
    assert created["State"] in ("Pending", "Active"), created

    assert cli.run("wait", "function-active-v2", "--function-name", name).stdout.strip() == ""
    got = cli.json("get-function", "--function-name", name)
    config = got["Configuration"]
    assert (config["State"], config["MemorySize"], config["Timeout"]) == ("Active", 256, 10), config
    assert config["Description"] == "made by the aws cli" and got["Tags"] == {"team": "cli"}

    marker = unique("printed")
    out = tmp_path / "response.json"
    result = cli.json("invoke", "--function-name", name, "--payload",
                      json.dumps({"who": "cli", "print": marker}), "--log-type", "Tail", str(out))
    assert result["StatusCode"] == 200 and result["ExecutedVersion"] == "$LATEST", result
    assert "FunctionError" not in result, result
    assert marker in base64.b64decode(result["LogResult"]).decode(errors="replace")
    assert json.loads(out.read_text()) == {"value": "one", "event": {"who": "cli", "print": marker},
                                           "greeting": "from-cli", "memory": 256}


def test_function_error_is_reported_not_failed(cli: Cli, tmp_path: Path) -> None:
    name = unique("cli-err")
    cli.create(name, write(tmp_path / "f.zip", package("one")))
    cli.run("wait", "function-active-v2", "--function-name", name)
    out = tmp_path / "error.json"
    result = cli.json("invoke", "--function-name", name, "--payload", '{"fail": "no luck"}', str(out))
    assert result["StatusCode"] == 200 and result["FunctionError"] == "Unhandled", result
    doc = json.loads(out.read_text())
    assert doc["errorMessage"] == "no luck" and doc["errorType"] == "RuntimeError", doc
    assert isinstance(doc["stackTrace"], list), doc


def test_list_functions(cli: Cli, tmp_path: Path) -> None:
    prefix = unique("cli-list")
    archive = write(tmp_path / "f.zip", package("listed"))
    ours = [f"{prefix}-{i}" for i in range(3)]
    for name in ours:
        cli.create(name, archive)

    everything = [f["FunctionName"] for f in cli.json("list-functions")["Functions"]]
    assert set(ours) <= set(everything) and len(everything) == len(set(everything)), everything
    by_one = [f["FunctionName"] for f in cli.json("list-functions", "--page-size", "1")["Functions"]]
    assert by_one == everything

    first = cli.json("list-functions", "--max-items", "1")
    assert len(first["Functions"]) == 1 and first.get("NextToken"), first
    rest = cli.json("list-functions", "--starting-token", first["NextToken"])
    assert [f["FunctionName"] for f in first["Functions"] + rest["Functions"]] == everything
    for f in cli.json("list-functions")["Functions"]:
        if f["FunctionName"] in ours:
            assert f["FunctionArn"] == function_arn(f["FunctionName"]) and f["Runtime"] == PYTHON, f


def test_publish_version_and_alias(cli: Cli, tmp_path: Path) -> None:
    name = unique("cli-ver")
    one = write(tmp_path / "one.zip", package("one"))
    cli.create(name, one)
    cli.run("wait", "function-active-v2", "--function-name", name)

    version = cli.json("publish-version", "--function-name", name, "--description", "first")
    assert (version["Version"], version["Description"]) == ("1", "first"), version
    assert version["FunctionArn"] == function_arn(name, qualifier="1")
    assert version["CodeSha256"] == code_sha256(one.read_bytes())
    cli.run("wait", "published-version-active", "--function-name", name, "--qualifier", "1")

    two = write(tmp_path / "two.zip", package("two"))
    updated = cli.json("update-function-code", "--function-name", name, "--zip-file", f"fileb://{two}")
    assert updated["CodeSha256"] == code_sha256(two.read_bytes()), updated
    cli.run("wait", "function-updated-v2", "--function-name", name)

    alias = cli.json("create-alias", "--function-name", name, "--name", "live", "--function-version", "1",
                     "--description", "from the cli")
    assert alias["AliasArn"] == function_arn(name, qualifier="live"), alias
    assert (alias["Name"], alias["FunctionVersion"]) == ("live", "1"), alias
    assert [a["Name"] for a in cli.json("list-aliases", "--function-name", name)["Aliases"]] == ["live"]

    out = tmp_path / "live.json"
    result = cli.json("invoke", "--function-name", name, "--qualifier", "live", str(out))
    assert result["ExecutedVersion"] == "1" and json.loads(out.read_text())["value"] == "one", result
    result = cli.json("invoke", "--function-name", f"{name}:$LATEST", str(out))
    assert result["ExecutedVersion"] == "$LATEST" and json.loads(out.read_text())["value"] == "two"

    versions = cli.json("list-versions-by-function", "--function-name", name)["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST", "1"], versions


def test_delete_function(cli: Cli, tmp_path: Path) -> None:
    name = unique("cli-del")
    cli.create(name, write(tmp_path / "f.zip", package("doomed")))
    cli.run("wait", "function-active-v2", "--function-name", name)
    cli.run("delete-function", "--function-name", name)
    gone = cli.run("get-function", "--function-name", name, check=False)
    assert gone.returncode != 0 and "ResourceNotFoundException" in gone.stderr, gone.stderr
    assert name not in [f["FunctionName"] for f in cli.json("list-functions")["Functions"]]


def test_credentials_and_scopes(cli: Cli, tmp_path: Path) -> None:
    bad = cli.run("list-functions", secret=cli.creds.secret_access_key[::-1] + "x", check=False)
    assert bad.returncode != 0 and "InvalidSignatureException" in bad.stderr, bad.stderr
    unknown = cli.run("list-functions", access_key_id="AKIAIMPULSUNKNOWN000", check=False)
    assert unknown.returncode != 0 and "UnrecognizedClientException" in unknown.stderr, unknown.stderr

    reader = make_credentials(cli.server, "read")
    assert "Functions" in cli.json("list-functions", creds=reader)
    denied = cli.run("create-function", "--function-name", unique("cli-denied"), "--runtime", PYTHON,
                     "--role", ROLE, "--handler", HANDLER,
                     "--zip-file", f"fileb://{write(tmp_path / 'f.zip', package('x'))}",
                     creds=reader, check=False)
    assert denied.returncode != 0 and "AccessDeniedException" in denied.stderr, denied.stderr
