"""Helpers shared by the Lambda door's acceptance tests (boto3, the AWS CLI, a Terraform replay).

The door is tested as a black box: AWS-style credentials come from ``POST /api/v1/keys``,
everything else goes through AWS clients speaking the wire that botocore's Lambda service
model describes.  Nothing here knows how the door is implemented.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError

from tests.helpers import Server, unique

ACCOUNT = "000000000000"
REGION = "us-east-1"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/impuls-test-role"
PYTHON = "python3.11"
HANDLER = "lambda_function.lambda_handler"
#: waiters poll every second; two minutes is far more than any build here needs
WAIT = {"Delay": 1, "MaxAttempts": 120}
#: botocore's Lambda limits, as GetAccountSettings reports them on AWS (and Impuls' own)
CODE_SIZE_ZIPPED = 50 * 1024 * 1024
CODE_SIZE_UNZIPPED = 250 * 1024 * 1024

T = TypeVar("T")


def function_arn(name: str, region: str = REGION, qualifier: str | None = None) -> str:
    arn = f"arn:aws:lambda:{region}:{ACCOUNT}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn


def zip_bytes(files: Mapping[str, str | bytes], executable: Iterable[str] = ()) -> bytes:
    """A zip archive of ``files``; the names in ``executable`` get mode 0755."""
    runnable = set(executable)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = ((0o100755 if name in runnable else 0o100644) << 16)
            zf.writestr(info, content)
    return buf.getvalue()


def python_zip(source: str, **extra: str | bytes) -> bytes:
    """A Python 3.11 package: ``lambda_function.py`` (handler ``lambda_function.lambda_handler``)."""
    return zip_bytes({"lambda_function.py": source, **extra})


def versioned_source(value: str) -> str:
    """A function that answers ``{"value": value, "greeting": $GREETING}``: each version differs."""
    return (
        "import os\n"
        f"VALUE = {value!r}\n"
        "def lambda_handler(event, context):\n"
        "    return {'value': VALUE, 'greeting': os.environ.get('GREETING')}\n"
    )


def code_sha256(data: bytes) -> str:
    """CodeSha256 as Lambda reports it: base64 of the sha256 digest."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def download(url: str) -> bytes:
    """Fetch a URL with no AWS credentials at all (as a browser or curl would)."""
    assert url.startswith(("http://", "https://")), url
    with urllib.request.urlopen(url, timeout=60) as resp:
        assert resp.status == 200, resp.status
        return bytes(resp.read())


@dataclass(frozen=True)
class Credentials:
    name: str
    scope: str
    access_key_id: str
    secret_access_key: str


def make_credentials(server: Server, scope: str, functions: str = "*") -> Credentials:
    """A new key of ``scope`` made with the admin key; its AWS-style half."""
    r = server.request("POST", "/api/v1/keys", json={"name": unique(f"lambda-{scope}"), "scope": scope,
                                                     "functions": functions})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["access_key_id"] and doc["secret_access_key"], doc
    return Credentials(doc["name"], scope, doc["access_key_id"], doc["secret_access_key"])


def client_config(**kw: Any) -> Config:
    return Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=120, **kw)


def lambda_client(url: str, access_key_id: str, secret_access_key: str, region: str = REGION,
                  **config: Any) -> Any:
    return boto3.client("lambda", endpoint_url=url, region_name=region, aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret_access_key, config=client_config(**config))


class LambdaDoor:
    """One server, a key of each scope (made on demand) and boto3 clients signed with them."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.url
        self._creds: dict[str, Credentials] = {}
        self._clients: dict[tuple[str, str], Any] = {}

    def creds(self, scope: str = "deploy") -> Credentials:
        if scope not in self._creds:
            self._creds[scope] = make_credentials(self.server, scope)
        return self._creds[scope]

    def client(self, scope: str = "deploy", region: str = REGION) -> Any:
        if (scope, region) not in self._clients:
            c = self.creds(scope)
            self._clients[scope, region] = lambda_client(self.url, c.access_key_id, c.secret_access_key,
                                                         region)
        return self._clients[scope, region]

    def signed(self, method: str, path: str, body: bytes = b"", scope: str = "deploy",
               region: str = REGION, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """A raw request signed with SigV4 exactly as botocore signs it, to look at the wire."""
        return signed_request(self.url, self.creds(scope), method, path, body, region, headers)

    def records(self, name: str) -> list[dict[str, Any]]:
        """The function's invocation records, read through the native API with the admin key."""
        r = self.server.request("GET", f"/api/v1/functions/{name}/invocations", params={"limit": 200})
        assert r.status_code == 200, r.text
        return list(r.json()["invocations"])


def signed_request(url: str, creds: Credentials, method: str, path: str, body: bytes = b"",
                   region: str = REGION, headers: Mapping[str, str] | None = None) -> httpx.Response:
    request = AWSRequest(method=method, url=url + path, data=body, headers=dict(headers or {}))
    signer = SigV4Auth(BotoCredentials(creds.access_key_id, creds.secret_access_key), "lambda", region)
    signer.add_auth(request)
    return httpx.request(method, url + path, content=body, headers=dict(request.headers.items()), timeout=60)


# --- waiting -------------------------------------------------------------------------------


def wait_active(client: Any, name: str) -> None:
    """boto3's ``function_active_v2`` waiter (GetFunction until Configuration.State is Active)."""
    client.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig=WAIT)


def wait_updated(client: Any, name: str) -> None:
    """boto3's ``function_updated_v2`` waiter (GetFunction until LastUpdateStatus is Successful)."""
    client.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig=WAIT)


def wait_version_active(client: Any, name: str, version: str) -> None:
    """boto3's ``published_version_active`` waiter (GetFunctionConfiguration of the version)."""
    client.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=version,
                                                        WaiterConfig=WAIT)


def poll(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 120,
         interval: float = 0.25, what: str = "condition") -> T:
    """Call ``probe`` until ``done(result)``; a generous deadline, never a speed assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last: {value!r}")
        time.sleep(interval)


# --- functions -----------------------------------------------------------------------------


def create_function(client: Any, code: bytes, name: str | None = None, wait: bool = True,
                    runtime: str = PYTHON, handler: str = HANDLER, **kw: Any) -> str:
    """CreateFunction (a unique name unless given), then the function_active_v2 waiter."""
    name = name or unique("lam")
    resp = client.create_function(FunctionName=name, Runtime=runtime, Role=ROLE, Handler=handler,
                                  Code={"ZipFile": code}, **kw)
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 201, resp
    assert resp["FunctionName"] == name
    if wait:
        wait_active(client, name)
    return name


def invoke(client: Any, name: str, event: Any = None, **kw: Any) -> tuple[dict[str, Any], Any]:
    """Invoke; returns the response (Payload read into ``RawPayload``) and the decoded payload."""
    if event is not None:
        kw["Payload"] = json.dumps(event).encode()
    resp = dict(client.invoke(FunctionName=name, **kw))
    raw = resp["Payload"].read()
    resp["RawPayload"] = raw
    return resp, (json.loads(raw) if raw else None)


def status_of(err: ClientError) -> int:
    return int(err.response["ResponseMetadata"]["HTTPStatusCode"])


def code_of(err: ClientError) -> str:
    return str(err.response["Error"]["Code"])


@contextlib.contextmanager
def lambda_error(client: Any, code: str, status: int) -> Iterator[pytest.ExceptionInfo[ClientError]]:
    """Expect the modeled exception ``client.exceptions.<code>`` (plain ClientError for the codes
    the service model does not declare, e.g. AccessDeniedException) with HTTP ``status``."""
    modeled = getattr(client.exceptions, code, None)
    with pytest.raises(modeled or ClientError) as info:
        yield info
    response = info.value.response
    assert response["Error"]["Code"] == code, response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == status, response
    assert response["Error"].get("Message"), f"{code} without a message: {response}"
    error_type = response["ResponseMetadata"]["HTTPHeaders"].get("x-amzn-errortype", "")
    assert error_type.split(":")[0] == code, f"x-amzn-ErrorType is {error_type!r}: {response}"
    if modeled is not None and status < 500:
        assert response.get("Type") == "User", f"body Type is not 'User': {response}"
