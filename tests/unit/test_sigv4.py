"""The SigV4 verifier against botocore's own signer: requests are signed by
``botocore.auth.SigV4Auth`` (or by a real boto3 Lambda client whose ``before-send``
hook captures the request instead of sending it), turned into what the server
would read off the wire, and verified with an injected clock."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSResponse
from botocore.credentials import Credentials

from impuls.auth.principal import Principal, Scope
from impuls.auth.sigv4 import SignatureRejected, Verified, verify

ENDPOINT = "http://127.0.0.1:9000"
REGION, SERVICE = "eu-west-1", "lambda"
AKID = "AKIAIMPULSTEST000001"
SECRET = "s3cr3t/AccessKey+0123456789abcdefghijklm"
PRINCIPAL = Principal("boto", Scope.INVOKE)
ARN_PATH = ("/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000"
            "%3Afunction%3Amy-fn%3Aprod/invocations")


def lookup(access_key_id: str) -> tuple[Principal, str] | None:
    return (PRINCIPAL, SECRET) if access_key_id == AKID else None


@dataclass(frozen=True)
class Wire:
    """A request as the server reads it: raw path and query, header pairs, body, and the
    time it was signed at (read back from its X-Amz-Date or Date header)."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def signed_at(self) -> datetime:
        found = dict((k.lower(), v) for k, v in self.headers)
        if "x-amz-date" in found:
            return datetime.strptime(found["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if "date" in found:
            return parsedate_to_datetime(found["date"])
        return datetime.strptime(_query_param(self.query, "X-Amz-Date"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    def header(self, name: str, value: str) -> Wire:
        """The same request with header ``name`` set to ``value`` (added if absent)."""
        kept = tuple((k, v) for k, v in self.headers if k.lower() != name.lower())
        return replace(self, headers=(*kept, (name, value)))

    def without(self, name: str) -> Wire:
        return replace(self, headers=tuple((k, v) for k, v in self.headers if k.lower() != name.lower()))

    def verify(self, after: timedelta = timedelta(seconds=1), **kw: Any) -> Verified:
        """Verify as the server would, ``after`` the signing time by the server's clock."""
        args: dict[str, Any] = {"body": self.body, "lookup": lookup, **kw}
        if "now" not in args:
            args["now"] = self.signed_at + after
        return verify(self.method, self.path, self.query, list(self.headers), **args)


def _query_param(query: str, name: str) -> str:
    return next(v for k, _, v in (p.partition("=") for p in query.split("&")) if k == name)


def on_the_wire(request: AWSPreparedRequest) -> Wire:
    """What the HTTP client puts on the wire: the URL's path and query as they are, the
    headers (plus the Host that the client adds, as botocore assumed when signing)."""
    url = urlsplit(request.url)
    headers = [(k, v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()]
    if not any(k.lower() == "host" for k, _ in headers):
        headers.append(("Host", url.netloc))
    body = request.body or b""
    return Wire(request.method, url.path, url.query, tuple(headers),
                body.encode() if isinstance(body, str) else body)


def sign(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         akid: str = AKID, secret: str = SECRET) -> Wire:
    request = AWSRequest(method=method, url=ENDPOINT + path, data=body, headers=headers or {})
    SigV4Auth(Credentials(akid, secret), SERVICE, REGION).add_auth(request)
    return on_the_wire(request.prepare())


def presign(path: str, expires: int = 60) -> Wire:
    request = AWSRequest(method="GET", url=ENDPOINT + path)
    SigV4QueryAuth(Credentials(AKID, SECRET), SERVICE, REGION, expires=expires).add_auth(request)
    return on_the_wire(request.prepare())


class _FakeRaw:
    def stream(self, **_: Any) -> Any:
        return iter([b"{}"])


@pytest.fixture
def boto3_wire() -> Callable[[Callable[[Any], object]], Wire]:
    """Call a real boto3 Lambda client; return the request it would have sent."""
    client = boto3.client("lambda", endpoint_url=ENDPOINT, region_name=REGION,
                          aws_access_key_id=AKID, aws_secret_access_key=SECRET)
    captured: list[AWSPreparedRequest] = []

    def before_send(request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        captured.append(request)
        return AWSResponse(request.url, 200, {}, _FakeRaw())

    client.meta.events.register("before-send", before_send)

    def call(operation: Callable[[Any], object]) -> Wire:
        operation(client)
        return on_the_wire(captured[-1])

    return call


def rejected(wire: Wire, code: str, **kw: Any) -> str:
    """The code of the rejection, checked; its message, checked for leaks."""
    with pytest.raises(SignatureRejected) as caught:
        wire.verify(**kw)
    error = caught.value
    assert error.code == code, error.message
    assert SECRET not in error.message
    assert not re.search(r"[0-9a-f]{64}", error.message)  # no signature (or hash) at all
    return error.message


# --- requests that pass -------------------------------------------------------------------


def test_get_with_a_query_string() -> None:
    wire = sign("GET", "/2015-03-31/functions?Marker=x&MaxItems=2")
    assert wire.query == "Marker=x&MaxItems=2"
    assert wire.verify() == Verified(PRINCIPAL, AKID, REGION, SERVICE)


def test_post_with_a_json_body() -> None:
    wire = sign("POST", "/2015-03-31/functions", b'{"FunctionName": "my-fn", "Runtime": "python3.12"}',
                {"Content-Type": "application/json"})
    assert wire.verify() == Verified(PRINCIPAL, AKID, REGION, SERVICE)
    # the door may hash the body itself and pass the hex digest instead
    assert wire.verify(body=hashlib.sha256(wire.body).hexdigest()).principal == PRINCIPAL


def test_boto3_invoke_by_function_arn_with_a_qualifier(boto3_wire: Any) -> None:
    wire = boto3_wire(lambda c: c.invoke(
        FunctionName="arn:aws:lambda:us-east-1:000000000000:function:my-fn:prod", Payload=b'{"a": 1}'))
    # encoded once on the wire; botocore signed it encoded twice (%253A)
    assert (wire.method, wire.path, wire.body) == ("POST", ARN_PATH, b'{"a": 1}')
    assert wire.verify() == Verified(PRINCIPAL, AKID, REGION, SERVICE)


def test_boto3_query_parameters_that_need_encoding(boto3_wire: Any) -> None:
    wire = boto3_wire(lambda c: c.list_functions(Marker="a b/c:d~e", MaxItems=2))
    assert wire.query == "Marker=a%20b%2Fc%3Ad~e&MaxItems=2"
    assert wire.verify().region == REGION


def test_unsigned_payload_leaves_the_body_out() -> None:
    wire = sign("POST", ARN_PATH, b'{"a": 1}', {"X-Amz-Content-Sha256": "UNSIGNED-PAYLOAD"})
    assert wire.verify().service == SERVICE
    # that is what UNSIGNED-PAYLOAD means: the client chose not to protect the body
    assert replace(wire, body=b'{"a": 2}').verify().service == SERVICE


def test_a_content_sha256_header_must_match_the_body() -> None:
    body = b'{"a": 1}'
    wire = sign("POST", ARN_PATH, body, {"X-Amz-Content-Sha256": hashlib.sha256(body).hexdigest()})
    assert wire.verify().principal == PRINCIPAL
    # the header is signed, but only a check against the body makes the signature cover it
    rejected(replace(wire, body=b'{"a": 2}'), "InvalidSignatureException")
    rejected(wire.header("X-Amz-Content-Sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
             "IncompleteSignatureException")


def test_header_values_with_repeated_spaces_and_repeated_headers() -> None:
    request = AWSRequest(method="POST", url=ENDPOINT + ARN_PATH, data=b"{}",
                         headers={"X-Amz-Client-Context": "  a   b\t c  "})
    request.headers["X-Custom"] = "one  two"
    request.headers["X-Custom"] = " three "  # a second header of that name, not a replacement
    SigV4Auth(Credentials(AKID, SECRET), SERVICE, REGION).add_auth(request)
    assert "SignedHeaders=host;x-amz-client-context;x-amz-date;x-custom," in request.headers["Authorization"]
    # botocore signs both X-Custom values, but prepare() keeps only the last one (a dict):
    # send the headers as signed, as another client would
    wire = replace(on_the_wire(request.prepare()),
                   headers=(*request.headers.items(), ("Host", "127.0.0.1:9000")))
    assert [v for k, v in wire.headers if k == "X-Custom"] == ["one  two", " three "]
    assert wire.verify().principal == PRINCIPAL
    # whitespace is canonicalized, so a proxy squeezing it changes nothing ...
    assert wire.header("X-Amz-Client-Context", "a b c").verify().principal == PRINCIPAL
    # ... but the order of repeated headers is signed
    swapped = replace(wire, headers=tuple(
        (k, {"one  two": " three ", " three ": "one  two"}.get(v, v)) for k, v in wire.headers))
    rejected(swapped, "InvalidSignatureException")


def test_a_date_header_instead_of_x_amz_date() -> None:
    wire = sign("GET", "/2015-03-31/functions", headers={"Date": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert not any(k.lower() == "x-amz-date" for k, _ in wire.headers)  # botocore re-dated Date
    assert wire.verify().principal == PRINCIPAL


def test_a_presigned_url() -> None:
    wire = presign("/2015-03-31/functions?MaxItems=2", expires=60)
    assert "X-Amz-Signature=" in wire.query and not any(k == "Authorization" for k, _ in wire.headers)
    assert wire.verify(after=timedelta(seconds=59)) == Verified(PRINCIPAL, AKID, REGION, SERVICE)
    assert "valid for 60 s" in rejected(wire, "InvalidSignatureException", after=timedelta(seconds=61))
    rejected(replace(wire, query=wire.query.replace("MaxItems=2", "MaxItems=3")),
             "InvalidSignatureException")
    rejected(replace(wire, query=wire.query.replace("X-Amz-Expires=60", "X-Amz-Expires=6000")),
             "InvalidSignatureException", after=timedelta(seconds=61))
    rejected(wire.header("Authorization", "AWS4-HMAC-SHA256 Credential=x"), "IncompleteSignatureException")


# --- requests that do not -----------------------------------------------------------------


def test_no_authorization_header() -> None:
    rejected(sign("GET", "/2015-03-31/functions").without("Authorization"),
             "MissingAuthenticationTokenException")


def test_another_scheme() -> None:
    wire = sign("GET", "/2015-03-31/functions")
    rejected(wire.header("Authorization", "Bearer impuls_0123456789ab_secret"),
             "MissingAuthenticationTokenException")
    rejected(wire.header("Authorization", "AWS AKIAIMPULSTEST000001:c2lnbmF0dXJl"),
             "MissingAuthenticationTokenException")


@pytest.mark.parametrize("mangle", [
    lambda a: a.replace("Signature=", "Sig="),  # no Signature
    lambda a: a.replace(", SignedHeaders=", ", SignedHeaders=x-amz-date;host&"),  # unsorted
    lambda a: a.replace("SignedHeaders=host;", "SignedHeaders="),  # Host not signed
    lambda a: a.replace("/aws4_request", "/aws4_request/extra"),  # bad credential scope
    lambda a: a.replace(f"{AKID}/", f"{AKID}/2026-01-01/"),  # bad credential scope
    lambda a: a[:-1],  # a short signature
    lambda a: a.split(" ")[0],  # the scheme alone
    lambda a: a + ", Signature=" + "0" * 64,  # a field twice
    lambda a: a.replace(", ", " "),  # no commas
])
def test_a_malformed_authorization_header(mangle: Callable[[str], str]) -> None:
    wire = sign("GET", "/2015-03-31/functions")
    authorization = dict(wire.headers)["Authorization"]
    rejected(wire.header("Authorization", mangle(authorization)), "IncompleteSignatureException")


def test_no_x_amz_date() -> None:
    rejected(sign("GET", "/2015-03-31/functions").without("X-Amz-Date"), "IncompleteSignatureException",
             now=datetime.now(UTC))


def test_an_unknown_access_key_id() -> None:
    rejected(sign("GET", "/2015-03-31/functions", akid="AKIAUNKNOWN000000000"),
             "UnrecognizedClientException")


def test_a_revoked_key() -> None:
    rejected(sign("GET", "/2015-03-31/functions"), "UnrecognizedClientException", lookup=lambda _: None)


def test_a_wrong_secret() -> None:
    rejected(sign("GET", "/2015-03-31/functions", secret="not-the-secret"), "InvalidSignatureException")


def test_tampering_breaks_the_signature(boto3_wire: Any) -> None:
    wire = boto3_wire(lambda c: c.invoke(FunctionName="my-fn", Payload=b'{"a": 1}'))
    assert wire.verify().principal == PRINCIPAL
    invalid = "InvalidSignatureException"
    rejected(replace(wire, body=b'{"a": 2}'), invalid)
    rejected(replace(wire, path=wire.path.replace("my-fn", "my-fm")), invalid)
    rejected(replace(wire, path=wire.path.upper()), invalid)
    rejected(replace(wire, method="PUT"), invalid)
    rejected(wire.header("Host", "evil.example:9000"), invalid)  # a signed header
    rejected(wire.without("Host"), invalid)  # a signed header gone
    rejected(wire.header("X-Amz-Date", (wire.signed_at + timedelta(seconds=1)).strftime("%Y%m%dT%H%M%SZ")),
             invalid)
    query = sign("GET", "/2015-03-31/functions?Marker=x&MaxItems=2")
    rejected(replace(query, query="Marker=x&MaxItems=3"), invalid)
    rejected(replace(query, query="Marker=x&MaxItems=2&FunctionVersion=ALL"), invalid)
    # unsigned headers may change (botocore does not sign User-Agent or its amz-sdk-* headers)
    assert wire.header("User-Agent", "curl/8").header("amz-sdk-request", "x").verify().principal == PRINCIPAL


def test_a_path_with_dot_segments_is_refused() -> None:
    # botocore signs the normalized path; routing on the raw one would act on another resource
    wire = sign("GET", "/2015-03-31/functions/other/../my-fn")
    assert wire.path == "/2015-03-31/functions/other/../my-fn"
    rejected(wire, "InvalidSignatureException")
    rejected(sign("GET", "/2015-03-31//functions"), "InvalidSignatureException")


def test_the_scope_date_must_be_the_request_date() -> None:
    wire = sign("GET", "/2015-03-31/functions")
    day = wire.signed_at.strftime("%Y%m%d")
    other = (wire.signed_at - timedelta(days=1)).strftime("%Y%m%d")
    authorization = dict(wire.headers)["Authorization"].replace(f"/{day}/", f"/{other}/")
    rejected(wire.header("Authorization", authorization), "InvalidSignatureException")


@pytest.mark.parametrize("minutes", [16, -16])
def test_a_request_signed_16_minutes_away_is_refused(minutes: int) -> None:
    wire = sign("GET", "/2015-03-31/functions")
    message = rejected(wire, "InvalidSignatureException", after=timedelta(minutes=minutes))
    assert "16 min 0 s" in message
    assert ("before" if minutes > 0 else "after") in message


@pytest.mark.parametrize("minutes", [14, -14])
def test_a_request_signed_14_minutes_away_passes(minutes: int) -> None:
    wire = sign("GET", "/2015-03-31/functions")
    assert wire.verify(after=timedelta(minutes=minutes)).principal == PRINCIPAL
