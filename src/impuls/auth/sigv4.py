"""AWS Signature Version 4, verified the way botocore signs it.

The Lambda-compatible door calls :func:`verify` with plain values taken off the
wire (method, raw path and query, header pairs, the body or its sha256) and a
``lookup`` of the shape of ``KeyStore.credentials``; it gets back who signed the
request and the region and service of the credential scope, or a
:class:`SignatureRejected` whose ``code`` is the AWS error code to answer with.

Two styles are accepted: the ``Authorization: AWS4-HMAC-SHA256 ...`` header, and
the presigned-URL style (``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``,
``X-Amz-Expires``, ``X-Amz-SignedHeaders``, ``X-Amz-Signature`` in the query).
No database, no HTTP framework here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote_to_bytes

from impuls.auth.principal import Principal
from impuls.errors import ImpulsError

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
#: how far a request's time may be from the server's clock (AWS uses 15 minutes)
MAX_SKEW = timedelta(minutes=15)
#: the longest a presigned URL may live (AWS: 7 days)
MAX_EXPIRES = 7 * 24 * 3600
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"

MISSING_TOKEN = "MissingAuthenticationTokenException"
INCOMPLETE = "IncompleteSignatureException"
UNRECOGNIZED = "UnrecognizedClientException"
INVALID = "InvalidSignatureException"

#: the access key id -> (principal, secret access key), None when unknown or revoked
Lookup = Callable[[str], tuple[Principal, str] | None]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_DATE = re.compile(r"^[0-9]{8}$")
_MISMATCH = ("The request signature we calculated does not match the signature you provided. "
             "Check your AWS Secret Access Key and signing method.")


class SignatureRejected(ImpulsError):
    """A request whose SigV4 signature cannot be accepted; ``code`` is the AWS error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Verified:
    """Who signed a request, and the region and service of its credential scope."""

    principal: Principal
    access_key_id: str
    region: str
    service: str


def verify(method: str, raw_path: str, raw_query: str, headers: Sequence[tuple[str, str]],
           body: bytes | str, lookup: Lookup, now: datetime | None = None) -> Verified:
    """Check one request's signature.

    ``raw_path`` and ``raw_query`` are as received (percent-encoded, no ``?``);
    ``headers`` are (name, value) pairs as received, repeats included; ``body`` is
    the body, or its sha256 as hex.  ``now`` is the server's clock (default: now).
    """
    header_map: dict[str, list[str]] = {}
    for name, value in headers:
        header_map.setdefault(name.strip().lower(), []).append(value)
    # Decoded pairs: they are re-encoded below the way the canonical request wants.
    query = [(unquote_to_bytes(k), unquote_to_bytes(v))
             for k, _, v in (p.partition("=") for p in raw_query.split("&") if p)]
    query_auth = {k.decode("latin-1"): v.decode("latin-1") for k, v in query
                  if k.lower().startswith(b"x-amz-")}
    authorization = header_map.get("authorization", [])

    if authorization and "X-Amz-Algorithm" in query_auth:
        raise SignatureRejected(INCOMPLETE, "A request is signed either in the Authorization header "
                                            "or in the query string, not both.")
    if "X-Amz-Algorithm" in query_auth:
        credential, signed_names, signature, timestamp, expires = _from_query(query_auth)
        # The signature cannot sign itself: the canonical query leaves it out.
        query = [(k, v) for k, v in query if k != b"X-Amz-Signature"]
    else:
        credential, signed_names, signature = _from_header(authorization)
        timestamp = _request_time(header_map)
        expires = None

    access_key_id, scope_date, region, service = _scope(credential)
    names = signed_names.split(";")
    if not signed_names or names != sorted(set(names)) or signed_names != signed_names.lower():
        raise SignatureRejected(INCOMPLETE, "SignedHeaders must be lower-case header names, "
                                            "sorted and separated by ';'.")
    if "host" not in names:
        # Unsigned, the Host would let a request signed for another server be replayed here.
        raise SignatureRejected(INCOMPLETE, "'Host' must be a signed header.")
    if not _SIGNATURE.match(signature):
        raise SignatureRejected(INCOMPLETE, "Signature must be 64 lower-case hex digits.")

    try:
        signed_at = datetime.strptime(timestamp, TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise SignatureRejected(INCOMPLETE, f"The request date must be like 20150830T123600Z, "
                                            f"not {timestamp[:40]!r}.") from None
    if scope_date != timestamp[:8]:
        # The signing key is derived per day; a key for another day must not sign today's requests.
        raise SignatureRejected(INVALID, f"Date in Credential scope ({scope_date}) does not match "
                                         f"the date of the request ({timestamp[:8]}).")
    _check_time(signed_at, expires, now)

    found = lookup(access_key_id)
    if found is None:
        raise SignatureRejected(UNRECOGNIZED, "The security token included in the request is invalid "
                                              "(unknown or revoked access key id).")
    principal, secret = found

    canonical_request = "\n".join([
        method.upper(),
        _canonical_uri(raw_path),
        _canonical_query(query),
        _canonical_headers(header_map, names),
        signed_names,
        _payload_hash(header_map, body),
    ])
    scope = f"{scope_date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join([ALGORITHM, timestamp, scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (scope_date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):  # constant time: no byte-by-byte oracle
        raise SignatureRejected(INVALID, _MISMATCH)
    return Verified(principal, access_key_id, region, service)


# --- where the signature's parts come from -------------------------------------------------


def _from_header(values: list[str]) -> tuple[str, str, str]:
    """(Credential, SignedHeaders, Signature) from the Authorization header."""
    if not values:
        raise SignatureRejected(MISSING_TOKEN, "Missing Authentication Token")
    if len(values) > 1:
        raise SignatureRejected(INCOMPLETE, "More than one Authorization header.")
    scheme, _, rest = values[0].strip().partition(" ")
    if scheme != ALGORITHM:
        # Another scheme (a bearer key, SigV2) is not a SigV4 attempt at all.
        raise SignatureRejected(MISSING_TOKEN, "Missing Authentication Token "
                                               f"(the Authorization header is not {ALGORITHM}).")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in fields:
            # name the part, never echo its value (it may be a signature)
            raise SignatureRejected(INCOMPLETE, f"Authorization header: {name[:40]!r} is not "
                                                "a single name=value pair.")
        fields[name] = value
    missing = [f for f in ("Credential", "SignedHeaders", "Signature") if f not in fields]
    if missing:
        raise SignatureRejected(INCOMPLETE, "Authorization header requires "
                                            + ", ".join(f"'{f}'" for f in missing) + ".")
    return fields["Credential"], fields["SignedHeaders"], fields["Signature"]


def _from_query(params: dict[str, str]) -> tuple[str, str, str, str, int]:
    """(Credential, SignedHeaders, Signature, timestamp, expires) from a presigned URL's query."""
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise SignatureRejected(MISSING_TOKEN, f"Missing Authentication Token (X-Amz-Algorithm is not "
                                               f"{ALGORITHM}).")
    names = ("X-Amz-Credential", "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Date",
             "X-Amz-Expires")
    missing = [n for n in names if n not in params]
    if missing:
        raise SignatureRejected(INCOMPLETE, "A presigned URL requires " + ", ".join(missing) + ".")
    expires = params["X-Amz-Expires"]
    if not expires.isdigit() or not 1 <= int(expires) <= MAX_EXPIRES:
        raise SignatureRejected(INCOMPLETE, f"X-Amz-Expires must be 1 to {MAX_EXPIRES} seconds.")
    credential, signed, signature, date, _ = (params[n] for n in names)
    return credential, signed, signature, date, int(expires)


def _request_time(header_map: dict[str, list[str]]) -> str:
    """The signing time: X-Amz-Date, else the Date header (botocore signs with Date when the
    request already had one), in the ``20150830T123600Z`` form of the string to sign."""
    amz_date = _one(header_map, "x-amz-date")
    if amz_date is not None:
        return amz_date.strip()
    date = _one(header_map, "date")
    if date is None:
        raise SignatureRejected(INCOMPLETE, "Authorization header requires existence of either "
                                            "a 'X-Amz-Date' or a 'Date' header.")
    try:
        return parsedate_to_datetime(date).astimezone(UTC).strftime(TIMESTAMP_FORMAT)
    except (TypeError, ValueError):
        raise SignatureRejected(INCOMPLETE, f"Date header {date[:40]!r} is not an HTTP date.") from None


def _scope(credential: str) -> tuple[str, str, str, str]:
    """``<access key id>/<date>/<region>/<service>/aws4_request`` -> its first four parts."""
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts) or not _DATE.match(parts[1]):
        raise SignatureRejected(INCOMPLETE, "Credential must be "
                                            "<access key id>/<YYYYMMDD>/<region>/<service>/aws4_request.")
    return parts[0], parts[1], parts[2], parts[3]


def _check_time(signed_at: datetime, expires: int | None, now: datetime | None) -> None:
    """Within 15 minutes of the server's clock either way; a presigned URL from its time
    until ``expires`` seconds later."""
    now = now or datetime.now(UTC)
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    age = now - signed_at
    stamp, server = signed_at.strftime(TIMESTAMP_FORMAT), now.strftime(TIMESTAMP_FORMAT)
    if -age > MAX_SKEW:
        raise SignatureRejected(INVALID, f"Signature not yet current: request time {stamp} is "
                                         f"{_span(-age)} after the server's time {server}; at most "
                                         "15 minutes are allowed (check the client's clock).")
    if expires is None and age > MAX_SKEW:
        raise SignatureRejected(INVALID, f"Signature expired: request time {stamp} is {_span(age)} "
                                         f"before the server's time {server}; at most 15 minutes "
                                         "are allowed (check the client's clock).")
    if expires is not None and age > timedelta(seconds=expires):
        raise SignatureRejected(INVALID, f"Signature expired: the URL signed at {stamp} was valid for "
                                         f"{expires} s; the server's time is {server}.")


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 60} min {seconds % 60} s"


# --- the canonical request -------------------------------------------------------------------


def _canonical_uri(raw_path: str) -> str:
    """botocore's canonical URI for every service but S3: the path with dot segments and
    repeated slashes removed, then percent-encoded AGAIN (``%3A`` -> ``%253A``), since it
    signs the already-encoded path of the URL it sends."""
    normalized = _remove_dot_segments(raw_path)
    if normalized != (raw_path or "/"):
        # The signature covers the normalized path: routing on a different raw path
        # (``/functions/x/../y``) would act on something other than what was signed.
        raise SignatureRejected(INVALID, "The request path must not contain '.', '..' or empty segments.")
    return quote(normalized, safe="/~")


def _remove_dot_segments(path: str) -> str:
    """botocore.utils.normalize_url_path: RFC 3986 dot-segment removal, plus empty segments."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    trailing = "/" if path.endswith("/") and out else ""
    return ("/" if path.startswith("/") or not path else "") + "/".join(out) + trailing


def _canonical_query(pairs: list[tuple[bytes, bytes]]) -> str:
    """Each name and value encoded with only the unreserved set left as is, sorted by name
    then value.  botocore sends its query encoded exactly so, hence decode + encode is
    the identity for its requests (it signs the raw pairs of the URL, sorted)."""
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _canonical_headers(header_map: dict[str, list[str]], names: list[str]) -> str:
    """``name:value`` lines for the signed headers, values trimmed, inner whitespace collapsed
    and repeats joined with ``,``; the blank line after them is part of the format."""
    lines = []
    for name in names:
        values = header_map.get(name)
        if values is None:
            raise SignatureRejected(INVALID, f"Signed header '{name}' is not in the request.")
        lines.append(name + ":" + ",".join(" ".join(v.split()) for v in values))
    return "\n".join(lines) + "\n"


def _payload_hash(header_map: dict[str, list[str]], body: bytes | str) -> str:
    """X-Amz-Content-Sha256 as sent when present (botocore signs it verbatim), else the body's
    sha256.  A hash in that header must match the body, or the signature would not cover it."""
    body_hash = hashlib.sha256(body).hexdigest() if isinstance(body, bytes) else body.lower()
    claimed = _one(header_map, "x-amz-content-sha256")
    if claimed is None:
        return body_hash
    claimed = claimed.strip()
    if claimed == UNSIGNED_PAYLOAD:  # the client chose not to sign the body
        return claimed
    if not _HEX64.match(claimed):
        raise SignatureRejected(INCOMPLETE, "X-Amz-Content-Sha256 must be a hex sha256 or "
                                            f"{UNSIGNED_PAYLOAD} (streaming payloads are not supported).")
    if not hmac.compare_digest(claimed.lower(), body_hash):
        raise SignatureRejected(INVALID, "The provided 'x-amz-content-sha256' header does not match "
                                         "what was computed.")
    return claimed


def _one(header_map: dict[str, list[str]], name: str) -> str | None:
    values = header_map.get(name)
    if values is not None and len(values) > 1:
        raise SignatureRejected(INCOMPLETE, f"More than one '{name}' header.")
    return values[0] if values else None
