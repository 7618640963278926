"""Traces: OpenTelemetry spans exported over OTLP/HTTP, when ``IMPULS_OTLP_ENDPOINT`` is set.

Off (the default), :func:`start` returns None and that None is all the engine, the event
dispatcher and the doors ever look at: one ``is None`` check per call; the OpenTelemetry
SDK is not even imported.  On, a :class:`Tracer` makes one span per invocation
(``invoke <function>``) with children for the wait for an instance (``queue wait``), a
cold start's ``driver.create`` (``instance start``) and the call into the runtime
(``runtime call``); asynchronous events get ``accept <function>`` and one
``deliver <function>`` span per delivery.  Spans go to a BatchSpanProcessor (a
background thread; flushed when the server stops) and from there to
``<endpoint>/v1/traces``.

A caller's W3C ``traceparent`` (and ``tracestate``; else an X-Ray ``X-Amzn-Trace-Id``)
is continued, and the function sees the same trace in X-Ray form
(:func:`xray_header`) in ``Lambda-Runtime-Trace-Id``, which its runtime puts in
``_X_AMZN_TRACE_ID``.

This module sits at the bottom of the stack with ``config.py``: it imports nothing of
Impuls's above it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from impuls import __version__
from impuls.config import Settings
from impuls.errors import Throttled

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

SERVICE_NAME = "impuls"
TRACES_PATH = "/v1/traces"
_HEX = frozenset("0123456789abcdefABCDEF")


# --- the two forms of a trace context ------------------------------------------------------


def xray_header(trace_id: int, span_id: int, sampled: bool) -> str:
    """The X-Ray trace header of a W3C trace id and span id: ``Root=1-<first 8 hex of the
    trace id>-<its other 24 hex>;Parent=<span id, 16 hex>;Sampled=1`` (or 0)."""
    hex_id = f"{trace_id:032x}"
    return f"Root=1-{hex_id[:8]}-{hex_id[8:]};Parent={span_id:016x};Sampled={1 if sampled else 0}"


def xray_to_traceparent(header: str) -> str | None:
    """The W3C ``traceparent`` of an X-Ray trace header, or None when it has no valid ``Root``
    and ``Parent``.  ``Sampled=0`` gives an unsampled parent; ``1``, ``?`` or none a sampled one."""
    fields: dict[str, str] = {}
    for part in header.split(";"):
        key, _, value = part.partition("=")
        fields[key.strip().lower()] = value.strip()
    version, _, rest = fields.get("root", "").partition("-")
    epoch, _, unique = rest.partition("-")
    trace, parent = (epoch + unique).lower(), fields.get("parent", "").lower()
    if version != "1" or len(epoch) != 8 or len(unique) != 24 or not _is_id(trace) or \
            len(parent) != 16 or not _is_id(parent):
        return None
    return f"00-{trace}-{parent}-{'00' if fields.get('sampled') == '0' else '01'}"


def traceparent_to_xray(traceparent: str) -> str | None:
    """The X-Ray trace header of a W3C ``traceparent`` (version 00), or None when it is not valid."""
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16 or \
            len(parts[3]) != 2 or not (_is_id(parts[1]) and _is_id(parts[2]) and set(parts[3]) <= _HEX):
        return None
    return xray_header(int(parts[1], 16), int(parts[2], 16), bool(int(parts[3], 16) & 1))


def _is_id(text: str) -> bool:
    return bool(text) and set(text) <= _HEX and int(text, 16) != 0


def parent_headers(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The caller's trace context from request headers (lower-case names): ``traceparent``
    and ``tracestate``, else ``X-Amzn-Trace-Id`` as a traceparent; (None, None) without one."""
    traceparent = headers.get("traceparent")
    if traceparent:
        return traceparent, headers.get("tracestate")
    xray = headers.get("x-amzn-trace-id")
    return (xray_to_traceparent(xray), None) if xray else (None, None)


def parent_of_asgi(raw: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """:func:`parent_headers` of an ASGI scope's headers."""
    wanted = {}
    for key, value in raw:
        if key in (b"traceparent", b"tracestate", b"x-amzn-trace-id"):
            wanted[key.decode("latin-1")] = value.decode("latin-1")
    return parent_headers(wanted)


# --- the tracer ------------------------------------------------------------------------------


def endpoint_url(endpoint: str) -> str:
    """Where spans are posted: ``<endpoint>/v1/traces`` (an endpoint naming that path is kept)."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def start(settings: Settings, node: str, sandbox: str) -> Tracer | None:
    """The server's tracer, exporting to ``settings.otlp_endpoint``; None when that is not set.

    The BatchSpanProcessor takes the standard ``OTEL_BSP_*`` variables (schedule delay, queue
    and batch sizes) and the exporter ``OTEL_EXPORTER_OTLP_HEADERS``/``..._TIMEOUT``/
    ``..._COMPRESSION``; the sampler ``OTEL_TRACES_SAMPLER`` (default: parent-based, always on)."""
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({
        "service.name": SERVICE_NAME, "service.version": __version__, "service.instance.id": node,
        "host.name": socket.gethostname(), "impuls.node": node, "impuls.sandbox": sandbox,
    })
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    url = endpoint_url(settings.otlp_endpoint)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return Tracer(provider, url)


class Tracer:
    """Makes Impuls's spans (see the module doc); one per server, made by :func:`start`."""

    def __init__(self, provider: TracerProvider, endpoint: str) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.endpoint = endpoint
        self._tracer = provider.get_tracer("impuls", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._root = Context()  # not the current context: a span without a parent starts a trace
        self._kinds = {"server": SpanKind.SERVER, "producer": SpanKind.PRODUCER,
                       "consumer": SpanKind.CONSUMER, "internal": SpanKind.INTERNAL}
        self._in_context = set_span_in_context
        self._status, self._error_code = Status, StatusCode.ERROR

    def _parent(self, traceparent: str | None, tracestate: str | None) -> Context:
        if not traceparent:
            return self._root
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        return self._propagator.extract(carrier, context=self._root)  # not valid: a new trace

    def start(self, name: str, kind: str = "internal", traceparent: str | None = None,
              tracestate: str | None = None, attributes: dict[str, Any] | None = None) -> Trace:
        """A span starting now, the child of the W3C ``traceparent`` (a new trace without one)."""
        span = self._tracer.start_span(name, self._parent(traceparent, tracestate), self._kinds[kind],
                                       attributes)
        return Trace(self, span)

    def invocation(self, function: str, request_id: str, traceparent: str | None,
                   tracestate: str | None) -> Trace:
        """The span of one invocation: ``invoke <function>``."""
        return self.start(f"invoke {function}", "server", traceparent, tracestate,
                          {"faas.name": function, "faas.invocation_id": request_id})

    def shutdown(self) -> None:
        """Export what is still buffered, then stop the exporter's thread."""
        self.provider.force_flush()
        self.provider.shutdown()


class Trace:
    """One span and its children: ``child`` (started now, ended by the caller), ``add`` (a child
    that already ended), and for an invocation the runtime call (``start_call``/``end_call``)."""

    __slots__ = ("_call", "_context", "_tracer", "span")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context = tracer._in_context(span, tracer._root)
        self._call: Span | None = None

    @property
    def traceparent(self) -> str:
        """This span as a W3C ``traceparent``: its children elsewhere (an event's delivery)."""
        ctx = self.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{'01' if ctx.trace_flags.sampled else '00'}"

    def child(self, name: str, attributes: dict[str, Any] | None = None, start_ns: int | None = None) -> Span:
        """A child span started now (or at ``start_ns``, from ``time.time_ns()``); the caller ends it."""
        return self._tracer._tracer.start_span(name, self._context, attributes=attributes,
                                               start_time=start_ns)

    def add(self, name: str, start_ns: int, attributes: dict[str, Any] | None = None,
            error_type: str | None = None, message: str = "") -> None:
        """A child span from ``start_ns`` (``time.time_ns()``) to now."""
        span = self.child(name, attributes, start_ns)
        if error_type:
            self._failed(span, error_type, message)
        span.end()

    def start_call(self, instance_id: str) -> str:
        """Start the ``runtime call`` span; returns its X-Ray header for the runtime."""
        self._call = call = self.child("runtime call", {"impuls.instance_id": instance_id})
        ctx = call.get_span_context()
        return xray_header(ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled)

    def end_call(self, error_type: str | None = None, message: str = "") -> None:
        call, self._call = self._call, None
        if call is not None:
            if error_type:
                self._failed(call, error_type, message)
            call.end()

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def finish(self, attributes: dict[str, Any], error_type: str | None = None, message: str = "") -> None:
        """End the span with ``attributes``; an error type marks it failed."""
        self.span.set_attributes(attributes)
        if error_type:
            self._failed(self.span, error_type, message)
        self.span.end()

    def fail(self, exc: BaseException) -> None:
        """End the span with the condition that ended its work (outcome ``throttled`` or
        ``refused``; ``error.type`` the condition's class, or a sandbox condition's type)."""
        self.end_call(type(exc).__name__)
        error_type = getattr(exc, "error_type", None) or type(exc).__name__
        outcome = "throttled" if isinstance(exc, Throttled) else "refused"
        self.finish({"impuls.outcome": outcome}, error_type, getattr(exc, "message", "") or str(exc))

    def _failed(self, span: Span, error_type: str, message: str) -> None:
        span.set_attribute("error.type", error_type)
        span.set_status(self._tracer._status(self._tracer._error_code, message[:256] or None))
