"""Impuls runtime client for Python: speaks the Lambda Runtime API (2018-06-01).

The host starts this file as ``python3 bootstrap.py`` with cwd = LAMBDA_TASK_ROOT. It loads
the handler named by ``_HANDLER`` once, then loops: GET .../invocation/next, call the handler,
POST the result (or the error) back, over one persistent HTTP/1.1 connection (TCP to
AWS_LAMBDA_RUNTIME_API, or the unix socket named by IMPULS_RUNTIME_API_SOCKET).

Response streaming: a handler that returns a generator (a generator function, ``def handler(
event, context): yield ...``, or an async generator function) streams its response: each item it
yields (``bytes``, ``bytearray``, ``memoryview`` or ``str``, sent as UTF-8) is posted as it is
yielded, in Lambda's streaming mode (``Lambda-Runtime-Function-Response-Mode: streaming``, a
chunked body, ``Content-Type: application/octet-stream``). If the FIRST item is a ``dict``, it is
the HTTP response's metadata for a function URL, ``{"statusCode": 200, "headers": {...},
"cookies": [...]}``: the body then starts with Lambda's HTTP integration prelude (that dict as
JSON, then eight NUL bytes) and its Content-Type is
``application/vnd.awslambda.http-integration-response`` (what Node's
``awslambda.HttpResponseStream.from`` writes). An exception raised by the generator, or an item
of another type (``Runtime.MarshalError``), ends the stream with the error trailers
``Lambda-Runtime-Function-Error-Type`` and ``Lambda-Runtime-Function-Error-Body`` (base64 of the
error document). Any other result is serialised to JSON and posted whole, as always.

Start-up time is part of every cold start, so this script imports almost nothing: it talks
HTTP by hand over the ``_socket`` C module and encodes/decodes JSON with the ``_json`` C
accelerator (``socket`` and ``json`` each pull in ``enum``/``re``, ~5 ms apiece). ``traceback``
and ``asyncio`` are imported only when needed. No third-party dependencies.
"""

import _socket
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Handler = Callable[[Any, "LambdaContext"], Any]

_RUNTIME = b"/2018-06-01/runtime"


# --------------------------------------------------------------------------------------------
# JSON


def _default(obj: object) -> object:
    """Encoder fallback: Decimal (e.g. from DynamoDB) becomes a number, like awslambdaric."""
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(obj, decimal.Decimal):
        if obj.is_finite() and obj == obj.to_integral_value():
            return int(obj)
        return float(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _make_json() -> "tuple[Callable[[bytes | bytearray], Any], Callable[[Any], str]]":
    """Return (loads, dumps) equivalent to json.loads / json.dumps(default=_default)."""
    try:
        from _json import encode_basestring_ascii, make_encoder, make_scanner

        class _Ctx:  # the attributes json.scanner.py_make_scanner reads from a JSONDecoder
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int
            parse_constant = {
                "-Infinity": float("-inf"),
                "Infinity": float("inf"),
                "NaN": float("nan"),
            }.__getitem__
            memo: dict[str, str] = {}

        scan = make_scanner(_Ctx())  # type: ignore[arg-type]
        markers: dict[int, Any] = {}
        encode = make_encoder(
            markers, _default, encode_basestring_ascii, None, ": ", ", ", False, False, True
        )

        def loads(data: bytes | bytearray) -> "Any":
            text = data.decode("utf-8")
            start = len(text) - len(text.lstrip(" \t\n\r")) if text[:1] in " \t\n\r" else 0
            try:
                obj, end = scan(text, start)
            except StopIteration as exc:
                from json import JSONDecodeError

                raise JSONDecodeError("Expecting value", text, exc.value) from None
            if end != len(text) and text[end:].strip(" \t\n\r"):
                from json import JSONDecodeError

                raise JSONDecodeError("Extra data", text, end)
            return obj

        def dumps(obj: "Any") -> str:
            try:
                return "".join(encode(obj, 0))
            except BaseException:
                markers.clear()  # the C encoder leaves ids of half-encoded containers behind
                raise

        if dumps({"a": [1.5, None, "\xe9"]}) == '{"a": [1.5, null, "\\u00e9"]}' and loads(
            b' {"a": [1, 2.5, "x", null, true]} '
        ) == {"a": [1, 2.5, "x", None, True]}:
            return loads, dumps
    except Exception:  # _json missing or its private API changed: use the public module
        pass
    import json

    encoder = json.JSONEncoder(default=_default)
    return json.loads, encoder.encode


_loads, _dumps = _make_json()


# --------------------------------------------------------------------------------------------
# HTTP/1.1 over one persistent socket


class _Connection:
    """A minimal keep-alive HTTP/1.1 client for the Runtime API; reconnects when dropped."""

    def __init__(self, api: str, unix_path: str | None) -> None:
        self.unix_path = unix_path
        host, _, port = api.rpartition(":")
        self.family = _socket.AF_INET
        if host.startswith("["):
            host = host[1:-1]
            self.family = _socket.AF_INET6
        self.address = (host, int(port or 0)) if not unix_path else ("", 0)
        self.host = b"localhost" if unix_path or not api else api.encode("latin-1")
        self.sock: _socket.socket | None = None
        self.buf = b""
        self.readable = select.poll()

    def connect(self) -> _socket.socket:
        if self.unix_path:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            target: Any = self.unix_path
        else:
            sock = _socket.socket(self.family, _socket.SOCK_STREAM)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            target = self.address
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buf = b""
        self.readable = select.poll()
        self.readable.register(sock.fileno(), select.POLLIN)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def request(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes | bytearray]:
        """Send one complete request (headers and body in one write), return the response."""
        attempt = 0
        while True:
            try:
                sock = self.sock or self.connect()
                sock.sendall(data)
                return self._response(sock)
            except OSError:
                self.close()
                attempt += 1
                if attempt > 3:
                    raise
                time.sleep(0.02 * (attempt - 1))  # first retry at once: a dropped keep-alive

    def recv(self, sock: _socket.socket) -> bytes:
        """What the socket holds, waiting for it with poll(POLLIN): a task asleep in recv()
        is also woken each time the server reads what this one sent (the socket's space
        wake-up, one per request), a poll for POLLIN only when data arrives."""
        try:
            return sock.recv(65536, _socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.readable.poll()
            return sock.recv(65536)

    def next_response(self, next_request: bytes) -> tuple[int, dict[bytes, bytes], bytes | bytearray]:
        """The response to a ``next_request`` already sent (pipelined after the last request);
        sent again on a new connection if this one was dropped."""
        if self.sock is not None:
            try:
                return self._response(self.sock)
            except OSError:
                self.close()
        return self.request(next_request)

    def _response(self, sock: _socket.socket) -> tuple[int, dict[bytes, bytes], bytes | bytearray]:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            chunk = self.recv(sock)
            if not chunk:
                raise ConnectionResetError("Runtime API closed the connection")
            buf += chunk
            end = buf.find(b"\r\n\r\n", max(len(buf) - len(chunk) - 3, 0))
        lines = buf[:end].split(b"\r\n")
        status = int(lines[0].split(None, 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        body: bytes | bytearray
        length = headers.get(b"content-length")
        if length is not None:
            stop = pos + int(length)
            if len(buf) >= stop:
                body = buf[pos:stop]
                self.buf = buf[stop:]
            else:  # large body: read the rest straight into one buffer
                body = bytearray(stop - pos)
                view = memoryview(body)
                have = len(buf) - pos
                view[:have] = buf[pos:]
                while have < len(body):
                    got = sock.recv_into(view[have:])
                    if not got:
                        raise ConnectionResetError("Runtime API closed the connection")
                    have += got
                self.buf = b""
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = self._chunked(sock, buf, pos)
        elif status < 200 or status in (204, 304):
            body = b""
            self.buf = buf[pos:]
        else:  # no framing: the body runs until the server closes the connection
            parts: list[bytes] = [buf[pos:]]
            while chunk := self.recv(sock):
                parts.append(chunk)
            body = b"".join(parts)
            self.close()
            return status, headers, body
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body

    def _chunked(self, sock: _socket.socket, buf: bytes, pos: int) -> bytes:
        parts: list[bytes] = []
        while True:
            eol = buf.find(b"\r\n", pos)
            while eol < 0:
                buf = self._more(sock, buf)
                eol = buf.find(b"\r\n", pos)
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:  # skip trailers up to the empty line
                while True:
                    eol = buf.find(b"\r\n", pos)
                    while eol < 0:
                        buf = self._more(sock, buf)
                        eol = buf.find(b"\r\n", pos)
                    line_empty = eol == pos
                    pos = eol + 2
                    if line_empty:
                        self.buf = buf[pos:]
                        return b"".join(parts)
            while len(buf) < pos + size + 2:
                buf = self._more(sock, buf)
            parts.append(buf[pos : pos + size])
            pos += size + 2

    def _more(self, sock: _socket.socket, buf: bytes) -> bytes:
        chunk = self.recv(sock)
        if not chunk:
            raise ConnectionResetError("Runtime API closed the connection")
        return buf + chunk

    def post(self, path: bytes, body: bytes, extra_headers: bytes = b"") -> int:
        status, _, _ = self.request(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path, self.host, len(body), extra_headers, body)
        )
        if not 200 <= status < 300:
            _log(f"impuls runtime: POST {path.decode('latin-1')} answered HTTP {status}\n")
        return status


# --------------------------------------------------------------------------------------------
# Context


class _CognitoIdentity:
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, data: "dict[str, Any]") -> None:
        self.cognito_identity_id = data.get("cognitoIdentityId")
        self.cognito_identity_pool_id = data.get("cognitoIdentityPoolId")


class _Client:
    __slots__ = (
        "app_package_name",
        "app_title",
        "app_version_code",
        "app_version_name",
        "installation_id",
    )

    def __init__(self, data: "dict[str, Any]") -> None:
        self.installation_id = data.get("installation_id")
        self.app_title = data.get("app_title")
        self.app_version_name = data.get("app_version_name")
        self.app_version_code = data.get("app_version_code")
        self.app_package_name = data.get("app_package_name")


class _ClientContext:
    __slots__ = ("client", "custom", "env")

    def __init__(self, data: "dict[str, Any]") -> None:
        client = data.get("client")
        self.client = _Client(client) if isinstance(client, dict) else None
        self.custom = data.get("custom", data.get("Custom"))  # SDKs send "custom"; Node's docs "Custom"
        self.env = data.get("env")


class LambdaContext:
    """The ``context`` argument; per-function fields are class attributes set once at start."""

    function_name: str = ""
    function_version: str = ""
    memory_limit_in_mb: int = 0
    log_group_name: str = ""
    log_stream_name: str = ""

    __slots__ = (
        "_deadline_ms",
        "aws_request_id",
        "client_context",
        "identity",
        "invoked_function_arn",
    )

    def __init__(self, request_id: str, deadline_ms: int, arn: str) -> None:
        self.aws_request_id = request_id
        self.invoked_function_arn = arn
        self._deadline_ms = deadline_ms
        self.identity: _CognitoIdentity | None = None
        self.client_context: _ClientContext | None = None

    def get_remaining_time_in_millis(self) -> int:
        return max(self._deadline_ms - int(time.time() * 1000), 0)

    def __repr__(self) -> str:
        return (
            f"LambdaContext([aws_request_id={self.aws_request_id},"
            f"function_name={self.function_name},function_version={self.function_version},"
            f"invoked_function_arn={self.invoked_function_arn},"
            f"memory_limit_in_mb={self.memory_limit_in_mb},"
            f"log_group_name={self.log_group_name},log_stream_name={self.log_stream_name},"
            f"identity={self.identity},client_context={self.client_context}])"
        )


# --------------------------------------------------------------------------------------------
# Errors


class _Fault(Exception):
    def __init__(self, error_type: str, message: str, trace: list[str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.trace = trace or []


def _log(text: str) -> None:
    stream = sys.stderr
    if stream is not None:
        try:
            stream.write(text)
            stream.flush()
        except Exception:
            pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:  # noqa: SIM105 (contextlib costs an import at start-up)
                stream.flush()
            except Exception:
                pass


def _describe(exc: BaseException) -> tuple[str, str, list[str]]:
    """(errorType, errorMessage, stackTrace) for an exception, like awslambdaric reports it."""
    if isinstance(exc, _Fault):
        return exc.error_type, exc.message, exc.trace
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    skip = 0  # leading frames of this file (and asyncio's plumbing) are not the user's code
    while skip < len(frames) and (
        frames[skip].filename == __file__ or "/asyncio/" in frames[skip].filename
    ):
        skip += 1
    return type(exc).__name__, str(exc), traceback.format_list(frames[skip:])


def _error_request(exc: BaseException) -> tuple[bytes, bytes]:
    """Log the error and return (body, extra headers) for an /error POST."""
    error_type, message, trace = _describe(exc)
    _log(
        f"[ERROR] {error_type}: {message}\n"
        + ("Traceback (most recent call last):\n" + "".join(trace) if trace else "")
    )
    body = _dumps({"errorMessage": message, "errorType": error_type, "stackTrace": trace})
    header_value = error_type.encode("ascii", "replace").replace(b"\r", b"").replace(b"\n", b"")
    return body.encode("utf-8"), b"Lambda-Runtime-Function-Error-Type: %s\r\n" % header_value


# --------------------------------------------------------------------------------------------
# Handler loading ("init")


def _load_handler(spec: str) -> "Handler":
    module_path, _, attr = spec.rpartition(".")
    if not module_path or not attr:
        raise _Fault(
            "Runtime.MalformedHandlerName",
            f"Bad handler '{spec}': not enough values to unpack (expected 2, got 1)",
        )
    module_name = module_path.replace("/", ".")
    if module_name.split(".", 1)[0] in sys.builtin_module_names:
        raise _Fault(
            "Runtime.BuiltInModuleConflict",
            f"Cannot use built-in module {module_name} as a handler module",
        )
    try:
        __import__(module_name)
        module = sys.modules[module_name]
    except ImportError as exc:
        raise _Fault(
            "Runtime.ImportModuleError", f"Unable to import module '{module_path}': {exc}"
        ) from None
    except SyntaxError as exc:
        raise _Fault(
            "Runtime.UserCodeSyntaxError",
            f"Syntax error in module '{module_path}': {exc}",
            [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}'],
        ) from None
    # Any other exception from the module's top level propagates; main() reports it with the
    # exception's class name as errorType, which is what awslambdaric does.
    try:
        handler = getattr(module, attr)
    except AttributeError:
        raise _Fault(
            "Runtime.HandlerNotFound", f"Handler '{attr}' missing on module '{module_path}'"
        ) from None
    if not callable(handler):
        raise _Fault(
            "Runtime.HandlerNotFound", f"Handler '{attr}' on module '{module_path}' is not callable"
        )
    return handler  # type: ignore[no-any-return]


_loop: "Any" = None


def _run_awaitable(awaitable: "Any") -> "Any":
    """Run a coroutine returned by the handler on the instance's single event loop."""
    global _loop
    if _loop is None:
        import asyncio
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:  # reuse a loop the module's top level may have created or set
                _loop = asyncio.get_event_loop_policy().get_event_loop()
            except RuntimeError:
                _loop = None
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(awaitable)


# --------------------------------------------------------------------------------------------
# Response streaming (see the module docstring)

_HTTP_INTEGRATION = b"application/vnd.awslambda.http-integration-response"
_PRELUDE_DELIMITER = b"\0" * 8
_LAST_CHUNK = b"0\r\n\r\n"


def _is_stream(result: object) -> bool:
    """A generator or an async generator (not any iterable: a list is a JSON result)."""
    return (hasattr(result, "__next__") and hasattr(result, "send")) or hasattr(result, "__anext__")


def _chunk(data: "bytes | bytearray | memoryview") -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if len(data) else b""


def _items(result: "Any") -> "Any":
    """The generator's items one by one, driving an async generator on the instance's loop."""
    if not hasattr(result, "__anext__"):
        yield from result
        return
    try:
        while True:
            try:
                yield _run_awaitable(result.__anext__())
            except StopAsyncIteration:
                return
    finally:
        _run_awaitable(result.aclose())


def _stream(conn: _Connection, path: bytes, result: "Any") -> None:
    """Post ``result``'s items as a streamed response to ``path``; the head goes with the first
    chunk, each chunk as it is yielded, then the last chunk, or the error trailers."""
    items = _items(result)
    sock: _socket.socket | None = None
    pending = b""  # the head (and prelude) until the first chunk goes with it
    first = True
    error: BaseException | None = None
    while True:
        try:
            item = next(items)
        except StopIteration:
            break
        except BaseException as exc:
            error = exc
            break
        if first and isinstance(item, dict):
            try:
                prelude = _dumps(item).encode("utf-8")
            except Exception as exc:
                error = _Fault("Runtime.MarshalError", f"Unable to marshal the HTTP prelude: {exc}")
                break
            pending = _stream_head(conn, path, _HTTP_INTEGRATION) + _chunk(prelude + _PRELUDE_DELIMITER)
            first = False
            continue
        if isinstance(item, str):
            data = item.encode("utf-8")
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            error = _Fault(
                "Runtime.MarshalError",
                f"Unable to stream an item of type {type(item).__name__}: yield bytes or str",
            )
            break
        if first:
            pending = _stream_head(conn, path, b"application/octet-stream")
            first = False
        if data or pending:
            sock = _send_stream(conn, sock, pending + _chunk(data))
            pending = b""
    if error is not None:
        _close_items(items)
    if first:  # nothing was yielded
        pending = _stream_head(conn, path, b"application/octet-stream")
    if error is None:
        tail = _LAST_CHUNK
    else:
        body, headers = _error_request(error)
        import binascii

        tail = b"0\r\n%sLambda-Runtime-Function-Error-Body: %s\r\n\r\n" % (
            headers, binascii.b2a_base64(body, newline=False))
    _flush()
    sock = _send_stream(conn, sock, pending + tail)
    status, _, _ = conn._response(sock)
    if not 200 <= status < 300:
        _log(f"impuls runtime: POST {path.decode('latin-1')} answered HTTP {status}\n")
    if error is not None and not isinstance(error, Exception):
        raise error  # SystemExit, KeyboardInterrupt: reported, now let the process end


def _stream_head(conn: _Connection, path: bytes, content_type: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nLambda-Runtime-Function-Response-Mode: streaming\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n"
        b"Content-Type: %s\r\n\r\n" % (path, conn.host, content_type)
    )


def _send_stream(conn: _Connection, sock: "_socket.socket | None", data: bytes) -> _socket.socket:
    """Send part of a streamed request.  The first part may go again on a new connection (a
    dropped keep-alive); once a part is sent, a lost connection cannot be recovered."""
    if sock is not None:
        sock.sendall(data)
        return sock
    try:
        sock = conn.sock or conn.connect()
        sock.sendall(data)
    except OSError:
        conn.close()
        sock = conn.connect()
        sock.sendall(data)
    return sock


def _close_items(items: "Any") -> None:
    try:  # noqa: SIM105 (contextlib costs an import at start-up)
        items.close()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# Main loop


def _serve(conn: _Connection, handler: "Handler") -> None:
    request = conn.request
    post = conn.post
    environ = os.environ
    next_request = b"GET %s/invocation/next HTTP/1.1\r\nHost: %s\r\n\r\n" % (_RUNTIME, conn.host)
    response_head = b" HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" % conn.host
    invocation = _RUNTIME + b"/invocation/"
    trace_set = "_X_AMZN_TRACE_ID" in environ
    # The trace id goes into os.environ's own mapping (encoded keys and values), not through
    # setenv(): glibc keeps every value setenv was ever given (a pointer getenv returned must
    # stay valid), so a new id per call grew the process by ~120 bytes a call.  The function
    # reads os.environ; a process it starts inherits the environment of the runtime's start.
    trace_env = environ._data  # type: ignore[attr-defined]
    sent_next = False  # the GET went out with the last response (pipelined)
    while True:
        status, headers, body = conn.next_response(next_request) if sent_next else request(next_request)
        sent_next = False
        if status != 200:
            _log(f"impuls runtime: GET /invocation/next answered HTTP {status}, exiting\n")
            sys.exit(1)
        raw_id = headers.get(b"lambda-runtime-aws-request-id", b"")
        deadline = headers.get(b"lambda-runtime-deadline-ms")
        context = LambdaContext(
            raw_id.decode("latin-1"),
            int(deadline) if deadline and deadline.isdigit() else 0,
            headers.get(b"lambda-runtime-invoked-function-arn", b"").decode("latin-1"),
        )
        trace_id = headers.get(b"lambda-runtime-trace-id")
        if trace_id:
            trace_env[b"_X_AMZN_TRACE_ID"] = trace_id
            trace_set = True
        elif trace_set:
            trace_env.pop(b"_X_AMZN_TRACE_ID", None)
            trace_set = False
        try:
            extra = headers.get(b"lambda-runtime-cognito-identity")
            if extra:
                context.identity = _CognitoIdentity(_loads(extra))
            extra = headers.get(b"lambda-runtime-client-context")
            if extra:
                context.client_context = _ClientContext(_loads(extra))
            try:
                event = _loads(body)
            except Exception as exc:
                raise _Fault(
                    "Runtime.UnmarshalError", f"Unable to unmarshal input: {exc}"
                ) from None
            result = handler(event, context)
            if hasattr(result, "__await__"):
                result = _run_awaitable(result)
            streamed = _is_stream(result)
            if not streamed:
                try:
                    payload = _dumps(result).encode("utf-8")
                except Exception as exc:
                    raise _Fault(
                        "Runtime.MarshalError", f"Unable to marshal response: {exc}"
                    ) from None
        except BaseException as exc:
            error_body, error_headers = _error_request(exc)
            _flush()
            post(invocation + raw_id + b"/error", error_body, error_headers)
            if not isinstance(exc, Exception):
                raise  # SystemExit, KeyboardInterrupt: reported, now let the process end
            continue
        if streamed:  # its own errors go in its trailers
            _stream(conn, invocation + raw_id + b"/response", result)
            continue
        _flush()
        status, _, _ = request(
            b"POST %s%s/response%sContent-Length: %d\r\n\r\n%s%s"
            % (invocation, raw_id, response_head, len(payload), payload, next_request)
        )
        sent_next = True
        if not 200 <= status < 300:
            _log(f"impuls runtime: POST /invocation/response answered HTTP {status}\n")


def main(after_init: "Callable[[], None] | None" = None) -> None:
    """Load the handler (the function's init), then serve calls.  ``after_init`` is
    called once the init succeeded, before the first call: the ``namespace`` sandbox's
    version template forks its instances there (it returns in each of them, see
    docs/init-once.md); the connection and the context fields are then set up afresh."""
    for stream in (sys.stdout, sys.stderr):  # stdout is a pipe: block buffered by default
        try:  # noqa: SIM105 (contextlib costs an import at start-up)
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except Exception:
            pass
    environ = os.environ
    unix_path = environ.pop("IMPULS_RUNTIME_API_SOCKET", None) or None
    api = environ.get("AWS_LAMBDA_RUNTIME_API", "")
    if not api and not unix_path:
        _log("impuls runtime: AWS_LAMBDA_RUNTIME_API is not set\n")
        sys.exit(1)
    task_root = environ.get("LAMBDA_TASK_ROOT") or os.getcwd()
    if sys.path and not sys.flags.safe_path:
        sys.path[0] = task_root  # replace this script's own directory
    else:
        sys.path.insert(0, task_root)

    _context_from(environ)
    conn = _Connection(api, unix_path)
    hooks = _RuntimeHooks()
    try:
        handler = _load_handler(environ.get("_HANDLER", ""))
        code = getattr(handler, "__code__", None)
        if code is not None and code.co_flags & 0x380:  # CO_(ITERABLE_)COROUTINE, CO_ASYNC_GENERATOR
            _run_awaitable(_noop())  # create the event loop during init, not on first call
        if after_init is not None:
            hooks.run(hooks.before_snapshot[::-1])
    except BaseException as exc:
        _init_error(conn, exc)
    if after_init is not None:
        after_init()  # returns in a forked instance
        conn.close()
        environ.pop("IMPULS_RUNTIME_API_SOCKET", None)
        _context_from(environ)
        try:
            hooks.run(hooks.after_restore)
        except BaseException as exc:
            _init_error(conn, exc)
    _serve(conn, handler)


def _init_error(conn: _Connection, exc: BaseException) -> None:
    """Report a failed init to the Runtime API and exit."""
    error_body, error_headers = _error_request(exc)
    _flush()
    conn.post(_RUNTIME + b"/init/error", error_body, error_headers)
    sys.exit(1)


class _RuntimeHooks:
    """The module ``snapshot_restore_py`` (as in Lambda's Python runtimes): functions register
    hooks with ``register_before_snapshot`` and ``register_after_restore`` (as decorators or
    calls with arguments).  Under init once (docs/init-once.md) the version template runs the
    first after the init, last registered first, and every forked instance the second, in
    order, before its first call; otherwise they never run.  A module of that name in the
    function's own code is shadowed."""

    def __init__(self) -> None:
        self.before_snapshot: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.after_restore: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        module = type(sys)("snapshot_restore_py")
        module.register_before_snapshot = self._register(self.before_snapshot)  # type: ignore[attr-defined]
        module.register_after_restore = self._register(self.after_restore)  # type: ignore[attr-defined]
        module.get_before_snapshot = lambda: list(self.before_snapshot)  # type: ignore[attr-defined]
        module.get_after_restore = lambda: list(self.after_restore)  # type: ignore[attr-defined]
        sys.modules["snapshot_restore_py"] = module

    @staticmethod
    def _register(hooks: "list[Any]") -> "Callable[..., Any]":
        def register(func: "Callable[..., Any]", *args: "Any", **kwargs: "Any") -> "Callable[..., Any]":
            hooks.append((func, args, kwargs))
            return func
        return register

    @staticmethod
    def run(hooks: "list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]") -> None:
        for func, args, kwargs in hooks:
            func(*args, **kwargs)


def _context_from(environ: "Any") -> None:
    """The per-function fields of ``LambdaContext``, from the environment."""
    LambdaContext.function_name = environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
    LambdaContext.function_version = environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
    try:
        LambdaContext.memory_limit_in_mb = int(environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", ""))
    except ValueError:
        LambdaContext.memory_limit_in_mb = 0
    LambdaContext.log_group_name = environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
    LambdaContext.log_stream_name = environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")


async def _noop() -> None:
    return None


if __name__ == "__main__":
    main()
