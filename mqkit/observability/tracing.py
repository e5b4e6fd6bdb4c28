"""OpenTelemetry traces of both clients: :class:`TracingMiddleware` (``mqkit[otel]``).

```python
from mqkit.observability import TracingMiddleware

client = mqkit.Client(service="billing", middleware=[TracingMiddleware()])  # global provider
```

Each message published gets a PRODUCER span (``publish <exchange>``, or ``publish <queue>``
on the default exchange), and each delivery handled a CONSUMER span (``process <queue>``)
around its handler (and the middleware inside this one). The W3C ``traceparent`` (and
``tracestate``, and baggage: whatever the global propagator carries) travels in the message
headers, so a consumer's span is a child of the publisher's, in any service, on either
client, and whatever the handler publishes is a child of the handler's span: one trace
crosses services, RPC requests and replies, retries (a retry copy keeps the headers),
dead-lettering and replay. A retried delivery's span also links to the first attempt's
(``mqkit.link`` = ``first_attempt``), which the retry copy names in the
``x-mqkit-first-attempt-traceparent`` header.

Attributes follow the OpenTelemetry messaging conventions for RabbitMQ:
``messaging.system`` = ``rabbitmq``, ``messaging.operation.type`` (``send`` / ``process``),
``messaging.operation.name`` (``publish`` / ``process``), ``messaging.destination.name`` (the
exchange, ``""`` for the default exchange), ``messaging.rabbitmq.destination.routing_key``,
``messaging.destination.subscription.name`` (the queue consumed), ``messaging.message.id``,
``messaging.message.conversation_id`` (the correlation id), ``messaging.message.body.size``,
and on failure ``error.type`` (the exception's class name: ``PublishUnroutable``,
``ValueError``, ``Reject``, ...) with the span's status ERROR. mqkit adds ``mqkit.attempt`` and
``mqkit.message.type``.

**With opentelemetry-instrumentation-pika or -aio-pika.** Those instrument the client
libraries' own calls (``channel.basic_publish``, ``Exchange.publish``, ``Queue.consume``).
mqkit's clients make none of those calls: the asyncio client speaks to aiormq directly, and
the blocking client calls pika's ``Channel`` methods past any per-channel wrapper. So on
mqkit's connections only this middleware makes spans and writes ``traceparent``; the
instrumentations keep tracing any other pika or aio-pika code in the same process, and a
message they publish is picked up by mqkit's consumers as a parent all the same.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextvars import Token
from typing import Any

from mqkit import __version__, explain
from mqkit.context import Context
from mqkit.correlation import current
from mqkit.errors import PublishError
from mqkit.middleware import (
    AsyncHandleNext,
    AsyncPublishNext,
    HandleNext,
    Middleware,
    Outgoing,
    PublishNext,
)

try:
    from opentelemetry import baggage, propagate, trace
    from opentelemetry import context as otel_context
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.propagators.textmap import Getter, TextMapPropagator
    from opentelemetry.trace import (
        INVALID_SPAN_CONTEXT,
        Link,
        NonRecordingSpan,
        Span,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TracerProvider,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - the extra is installed wherever tests run
    raise explain.missing_extra(
        "mqkit.observability.TracingMiddleware", "otel", "opentelemetry-api"
    ) from exc

__all__ = ["FIRST_ATTEMPT", "TracingMiddleware"]

# The header of a retry or dead-letter copy that names the first attempt's span.
FIRST_ATTEMPT = "x-mqkit-first-attempt-traceparent"

SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
SUBSCRIPTION = "messaging.destination.subscription.name"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
BODY_SIZE = "messaging.message.body.size"
BATCH_COUNT = "messaging.batch.message_count"
ERROR_TYPE = "error.type"

_REPLY_TO = "amq.rabbitmq.reply-to"


class _HeaderGetter(Getter[dict[str, Any]]):
    """Reads propagation fields from AMQP headers (text, or bytes a client left undecoded)."""

    def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: dict[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()
# The fields of the W3C propagators (tracecontext and baggage: OpenTelemetry's default).
_W3C = frozenset({"traceparent", "tracestate", "baggage"})
# A version-00 traceparent (the W3C format TraceContextTextMapPropagator reads, without the
# future versions' extra fields it also accepts: those it reads itself).
_TRACEPARENT = re.compile("[ \t]*00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})[ \t]*")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
# Consumer span starts kept per middleware (direct reply-to queues have a name per caller).
_STARTS_LIMIT = 1000
_EMPTY = OtelContext()
_TRACECONTEXT = TraceContextTextMapPropagator()


class TracingMiddleware(Middleware):
    """A PRODUCER span per message published and a CONSUMER span per delivery handled, with
    the W3C trace context in the message headers (see the module's docstring). Works on
    ``Client`` and ``AsyncClient``.

    ``tracer_provider``: the provider to take the tracer from (default: the global one,
    ``opentelemetry.trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("mqkit", __version__, tracer_provider)
        self._propagator: object = None
        self._fields: frozenset[str] = frozenset()
        self._w3c = False  # the propagator writes only W3C fields (traceparent among them)
        # (queue, exchange) -> a consumer span's name and creation attributes; read-only
        # once made (the SDK copies attributes into the span), so shared by every delivery
        self._consume_starts: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self._publish_starts: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return "TracingMiddleware()"

    # -- publishing ----------------------------------------------------------------------

    def publish(self, messages: list[Outgoing], call_next: PublishNext) -> list[str]:
        span = self._start_publish(messages)
        try:
            ids = call_next(messages)
        except BaseException as exc:
            _end_publish(messages, span, exc)
            raise
        _end_publish(messages, span, None)
        return ids

    async def publish_async(
        self, messages: list[Outgoing], call_next: AsyncPublishNext
    ) -> list[str]:
        span = self._start_publish(messages)
        try:
            ids = await call_next(messages)
        except BaseException as exc:
            _end_publish(messages, span, exc)
            raise
        _end_publish(messages, span, None)
        return ids

    def _start_publish(self, messages: Sequence[Outgoing]) -> Span:
        """One PRODUCER span for the call: its messages are created and sent in it, so each
        carries its context (a batch's span counts them, as the conventions have it)."""
        first = messages[0]
        # the span's name is the exchange's, or on the default exchange the queue's
        key = (first.exchange, "" if first.exchange else first.routing_key)
        start = self._publish_starts.get(key)
        if start is None:
            start = self._publish_start(*key)
        span = self._tracer.start_span(start[0], kind=SpanKind.PRODUCER, attributes=start[1])
        if span.is_recording():  # an unsampled publish builds no attributes
            span.set_attributes(_publish_attributes(messages))
        carrier = self._carrier(span)
        if carrier:
            for message in messages:
                message.headers.update(carrier)
        return span

    def _publish_start(self, exchange: str, routing_key: str) -> tuple[str, dict[str, Any]]:
        """A producer span's name and the attributes a sampler sees (those the conventions
        want at creation), the same for every publish to ``exchange`` (``routing_key``: the
        queue, on the default exchange)."""
        start = (
            f"publish {exchange or _queue_name(routing_key)}",
            {
                SYSTEM: "rabbitmq",
                OPERATION_TYPE: "send",
                OPERATION_NAME: "publish",
                DESTINATION: exchange,
            },
        )
        if len(self._publish_starts) < _STARTS_LIMIT:
            self._publish_starts[(exchange, routing_key)] = start
        return start

    def _carrier(self, span: Span) -> dict[str, str]:
        """The headers that carry ``span``'s context: what the global propagator injects.
        With the W3C propagators (OpenTelemetry's default) and no baggage, that is
        ``traceparent`` (and ``tracestate``), written here without building a context."""
        propagator = self._propagator_now()
        carrier: dict[str, str] = {}
        if self._w3c and not baggage.get_all():
            context = span.get_span_context()
            if context != INVALID_SPAN_CONTEXT:  # as TraceContextTextMapPropagator.inject
                carrier["traceparent"] = (
                    f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
                )
                if context.trace_state:
                    carrier["tracestate"] = context.trace_state.to_header()
            return carrier
        propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    # -- handling ------------------------------------------------------------------------

    def handle(self, message: Any, ctx: Context, call_next: HandleNext) -> Any:
        span, token = self._start_handle(ctx)
        try:
            return call_next(message, ctx)
        except BaseException as exc:
            self._failed(ctx, span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    async def handle_async(self, message: Any, ctx: Context, call_next: AsyncHandleNext) -> Any:
        span, token = self._start_handle(ctx)
        try:
            return await call_next(message, ctx)
        except BaseException as exc:
            self._failed(ctx, span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def _start_handle(self, ctx: Context) -> tuple[Span, Token[OtelContext]]:
        headers = ctx.headers
        parent = self._parent(headers) if headers else _EMPTY  # nothing: a new trace
        start = self._consume_starts.get((ctx.queue, ctx.exchange))
        if start is None:
            start = self._consume_start(ctx.queue, ctx.exchange)
        span = self._tracer.start_span(
            start[0],
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=start[1],
            links=_first_attempt(headers) if FIRST_ATTEMPT in headers else (),
        )
        if span.is_recording():  # an unsampled delivery builds no attributes
            attributes: dict[str, Any] = {}
            if ctx.routing_key:
                attributes[ROUTING_KEY] = ctx.routing_key
            if ctx.message_id:
                attributes[MESSAGE_ID] = ctx.message_id
            if ctx.correlation_id:
                attributes[CONVERSATION_ID] = ctx.correlation_id
            if ctx.attempt > 1:
                attributes["mqkit.attempt"] = ctx.attempt
            span.set_attributes(attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def _parent(self, headers: dict[str, Any]) -> OtelContext:
        """The context the global propagator extracts from ``headers``. With the W3C
        propagators, a plain version-00 ``traceparent`` (no ``tracestate``, no baggage) is
        read here, as theirs reads it, without a regular expression per delivery."""
        propagator = self._propagator_now()
        if self._fields.isdisjoint(headers):
            return _EMPTY
        if self._w3c and "tracestate" not in headers and "baggage" not in headers:
            parent = _traceparent(headers.get("traceparent"))
            if parent is not None:
                return parent
        return propagator.extract(headers, getter=_GETTER)

    def _propagator_now(self) -> TextMapPropagator:
        """The global propagator, and its fields (read once per propagator)."""
        propagator = propagate.get_global_textmap()
        if propagator is not self._propagator:
            fields = frozenset(propagator.fields)
            self._propagator, self._fields = propagator, fields
            self._w3c = "traceparent" in fields and fields <= _W3C
        return propagator

    def _consume_start(self, queue: str, exchange: str) -> tuple[str, dict[str, Any]]:
        """A consumer span's name and the attributes a sampler sees (those the conventions
        want at creation), the same for every delivery from ``queue`` via ``exchange``."""
        start = (
            f"process {_queue_name(queue)}",
            {
                SYSTEM: "rabbitmq",
                OPERATION_TYPE: "process",
                OPERATION_NAME: "process",
                DESTINATION: exchange,
                SUBSCRIPTION: queue,
            },
        )
        if len(self._consume_starts) < _STARTS_LIMIT:
            self._consume_starts[(queue, exchange)] = start
        return start

    def _failed(self, ctx: Context, span: Span, error: BaseException) -> None:
        _fail(span, error)
        if FIRST_ATTEMPT in ctx.headers:
            return  # a later attempt: the copy keeps naming the first
        scope = current()
        if scope is not None:  # a retry or dead-letter copy names this span as the first
            carrier: dict[str, str] = {}
            _TRACECONTEXT.inject(carrier, context=trace.set_span_in_context(span))
            if "traceparent" in carrier:
                scope.copy_headers[FIRST_ATTEMPT] = carrier["traceparent"]


def _publish_attributes(messages: Sequence[Outgoing]) -> dict[str, Any]:
    """A recording producer span's attributes beyond those it was started with."""
    first = messages[0]
    envelope = first.envelope
    attributes: dict[str, Any] = {}
    if len(messages) == 1:
        attributes[MESSAGE_ID] = envelope.message_id
        attributes[BODY_SIZE] = len(envelope.body)
        if first.routing_key:
            attributes[ROUTING_KEY] = first.routing_key
        if envelope.correlation_id:
            attributes[CONVERSATION_ID] = envelope.correlation_id
        return attributes
    attributes[BATCH_COUNT] = len(messages)
    keys = {message.routing_key for message in messages}
    if len(keys) == 1 and first.routing_key:
        attributes[ROUTING_KEY] = first.routing_key
    conversations = {message.envelope.correlation_id for message in messages}
    if len(conversations) == 1 and envelope.correlation_id:
        attributes[CONVERSATION_ID] = envelope.correlation_id
    return attributes


def _queue_name(name: str) -> str:
    """A span name's queue: direct reply-to's per-caller names collapse into one."""
    return _REPLY_TO if name.startswith(_REPLY_TO) else name


def _traceparent(value: object) -> OtelContext | None:
    """The context of a version-00 ``traceparent`` as TraceContextTextMapPropagator reads
    it, or None for anything else (the propagator itself then reads the headers)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    span = NonRecordingSpan(
        SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags, 16)),
        )
    )
    return trace.set_span_in_context(span, _EMPTY)


def _first_attempt(headers: dict[str, Any]) -> Sequence[Link]:
    """A link to the first attempt's span, when a retry or dead-letter copy names it."""
    value = _GETTER.get(headers, FIRST_ATTEMPT)
    if not value:
        return ()
    first = trace.get_current_span(_TRACECONTEXT.extract({"traceparent": value[0]}))
    context = first.get_span_context()
    if not context.is_valid:
        return ()
    return (Link(context, {"mqkit.link": "first_attempt"}),)


def _fail(span: Span, error: BaseException) -> None:
    name = type(error).__name__
    span.set_attribute(ERROR_TYPE, name)
    span.set_status(Status(StatusCode.ERROR, f"{name}: {error}"))
    if isinstance(error, Exception):
        span.record_exception(error)


def _end_publish(messages: Sequence[Outgoing], span: Span, error: BaseException | None) -> None:
    if error is not None:
        if isinstance(error, PublishError) and error.unconfirmed and len(messages) > 1:
            span.set_attribute("mqkit.unconfirmed", len(error.unconfirmed))
        _fail(span, error)
    span.end()
