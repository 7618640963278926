"""The Lambda API row: the warm Python function invoked through AWS Lambda's ``Invoke``, signed
with Signature Version 4 as boto3 signs it, next to the native invoke of the same function.

wrk replays one signed request: a signature stays valid for 15 minutes, far longer than a
row, so every call pays the server's full check (parse, canonical request, HMAC chain)."""

from __future__ import annotations

from typing import Any


def signed_headers(url: str, body: bytes, access_key_id: str, secret: str,
                   region: str = "us-east-1") -> dict[str, str]:
    """The headers botocore's SigV4 signer adds to ``POST url`` with ``body``."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method="POST", url=url, data=body)
    SigV4Auth(Credentials(access_key_id, secret), "lambda", region).add_auth(request)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}


def invoke_path(function: str) -> str:
    return f"/2015-03-31/functions/{function}/invocations"


def credentials(call: Any) -> tuple[str, str]:
    """An invoke-scope key's AWS credentials, made through the native API (``call`` is
    ``ImpulsServer.call``)."""
    doc = call("POST", "/api/v1/keys", {"name": "bench-sigv4", "scope": "invoke"})
    return str(doc["access_key_id"]), str(doc["secret_access_key"])

