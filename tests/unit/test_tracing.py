"""TracingMiddleware without a broker (the SDK's in-memory exporter): spans, their attributes
by the messaging conventions for RabbitMQ, the trace context in headers, failures, and the
link of a retried delivery to its first attempt."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

import mqkit
from mqkit.context import Context
from mqkit.correlation import handling
from mqkit.errors import PublishUnroutable
from mqkit.messages import encode
from mqkit.middleware import MiddlewareStack, Outgoing
from mqkit.observability import TracingMiddleware
from mqkit.observability.tracing import FIRST_ATTEMPT


class Order(BaseModel):
    order_id: str


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def stacks(provider: TracerProvider) -> tuple[MiddlewareStack, MiddlewareStack]:
    tracing = TracingMiddleware(provider)
    return (
        MiddlewareStack([tracing], runtime="sync"),
        MiddlewareStack([tracing], runtime="async"),
    )


def message(exchange: str = "", key: str = "orders", **kwargs: Any) -> Outgoing:
    return Outgoing(encode(Order(order_id="42"), service="shop", **kwargs), exchange, key)


def confirmed(ms: list[Outgoing]) -> list[str]:
    return [m.message_id for m in ms]


def delivered(sent: Outgoing, *, attempt: int = 1, queue: str = "orders") -> Context:
    """The Context a consumer of ``sent`` gets."""
    return Context(
        message_id=sent.message_id,
        correlation_id=sent.correlation_id,
        headers=dict(sent.headers),
        attempt=attempt,
        exchange=sent.exchange,
        routing_key=sent.routing_key,
        queue=queue,
        event_type=sent.event_type,
    )


def only(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == kind]


def test_a_publish_makes_a_producer_span_and_carries_its_traceparent(provider, exporter):
    sync, _ = stacks(provider)
    sent = message(correlation_id="conv-1")
    sync.publish([sent], confirmed)
    [span] = exporter.get_finished_spans()
    assert span.kind == SpanKind.PRODUCER and span.name == "publish orders"
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "",
        "messaging.rabbitmq.destination.routing_key": "orders",
        "messaging.message.id": sent.message_id,
        "messaging.message.conversation_id": "conv-1",
        "messaging.message.body.size": len(sent.envelope.body),
    }
    context = span.get_span_context()
    assert context is not None
    assert sent.headers["traceparent"].startswith(
        f"00-{context.trace_id:032x}-{context.span_id:016x}-"
    )
    assert span.status.status_code == StatusCode.UNSET


def test_an_exchange_publish_is_named_by_its_exchange(provider, exporter):
    sync, _ = stacks(provider)
    sync.publish([message(exchange="shop", key="orders.placed")], confirmed)
    [span] = exporter.get_finished_spans()
    assert span.name == "publish shop"
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == "shop"
    assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "orders.placed"


def test_reply_to_names_collapse_in_span_names(provider, exporter):
    sync, _ = stacks(provider)
    sync.publish([message(key="amq.rabbitmq.reply-to.g1h2AA.x")], confirmed)
    [span] = exporter.get_finished_spans()
    assert span.name == "publish amq.rabbitmq.reply-to"


def test_a_publish_inside_a_span_is_its_child(provider, exporter):
    sync, _ = stacks(provider)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("checkout") as parent:
        sync.publish([message()], confirmed)
    publish = only(exporter, SpanKind.PRODUCER)[0]
    assert publish.parent is not None
    assert publish.parent.span_id == parent.get_span_context().span_id


def test_a_batch_is_one_span_whose_context_every_message_carries(provider, exporter):
    sync, _ = stacks(provider)
    batch = [message(correlation_id="conv-1") for _ in range(3)]
    sync.publish(batch, confirmed)
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 3
    assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "orders"
    assert span.attributes["messaging.message.conversation_id"] == "conv-1"
    assert "messaging.message.id" not in span.attributes
    assert len({m.headers["traceparent"] for m in batch}) == 1
    assert batch[0].headers["traceparent"].split("-")[2] == f"{span_id(span):016x}"


def test_a_batch_to_several_keys_and_conversations_names_neither(provider, exporter):
    sync, _ = stacks(provider)
    batch = [
        message(exchange="shop", key="a", correlation_id="c1"),
        message(exchange="shop", key="b", correlation_id="c2"),
    ]
    sync.publish(batch, confirmed)
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert "messaging.rabbitmq.destination.routing_key" not in span.attributes
    assert "messaging.message.conversation_id" not in span.attributes


def test_a_failed_publish_marks_its_span_and_counts_what_was_not_confirmed(provider, exporter):
    sync, _ = stacks(provider)
    first, second = message(), message()

    def send(ms: list[Outgoing]) -> list[str]:
        raise PublishUnroutable("no queue bound", unconfirmed=[second.message_id])

    with pytest.raises(PublishUnroutable):
        sync.publish([first, second], send)
    [failed] = exporter.get_finished_spans()
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "PublishUnroutable"
    assert failed.attributes["mqkit.unconfirmed"] == 1
    assert [e.name for e in failed.events] == ["exception"]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def test_a_handled_delivery_is_a_consumer_span_child_of_the_publish(provider, exporter):
    sync, _ = stacks(provider)
    sent = message(exchange="shop", key="orders.placed", correlation_id="conv-1")
    sync.publish([sent], confirmed)
    ctx = delivered(sent, queue="billing.orders")
    inner: list[Outgoing] = []

    def handler(m: object, c: Context) -> str:
        follow = message(key="invoices")
        sync.publish([follow], confirmed)  # published from inside the handler
        inner.append(follow)
        return "ok"

    with handling(ctx):
        assert sync.handle(handler, None, ctx) == "ok"
    publish, follow_up = only(exporter, SpanKind.PRODUCER)
    [process] = only(exporter, SpanKind.CONSUMER)
    assert process.name == "process billing.orders"
    assert process.parent is not None and publish.context is not None
    assert process.parent.span_id == publish.context.span_id
    assert process.context is not None and follow_up.parent is not None
    assert process.context.trace_id == publish.context.trace_id
    assert follow_up.parent.span_id == process.context.span_id  # the handler's publish
    assert dict(process.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "shop",
        "messaging.rabbitmq.destination.routing_key": "orders.placed",
        "messaging.destination.subscription.name": "billing.orders",
        "messaging.message.id": sent.message_id,
        "messaging.message.conversation_id": "conv-1",
    }  # mqkit.attempt only from the second attempt on
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


async def test_the_same_on_asyncclient(provider, exporter):
    _, async_stack = stacks(provider)
    sent = message()

    async def send(ms: list[Outgoing]) -> list[str]:
        return confirmed(ms)

    await async_stack.publish_async([sent], send)
    ctx = delivered(sent)

    async def handler(m: object, c: Context) -> None:
        await async_stack.publish_async([message(key="invoices")], send)

    with handling(ctx):
        await async_stack.handle_async(handler, None, ctx)
    publish, follow_up = only(exporter, SpanKind.PRODUCER)
    [process] = only(exporter, SpanKind.CONSUMER)
    assert process.parent is not None and publish.context is not None
    assert process.parent.span_id == publish.context.span_id
    assert follow_up.parent is not None and process.context is not None
    assert follow_up.parent.span_id == process.context.span_id


def test_a_message_without_trace_context_starts_a_trace(provider, exporter):
    sync, _ = stacks(provider)
    ctx = Context(message_id="m", correlation_id=None, queue="orders", headers={})
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("unrelated"), handling(ctx):  # e.g. a worker's own span
        sync.handle(lambda m, c: None, None, ctx)
    [process] = only(exporter, SpanKind.CONSUMER)
    assert process.parent is None


def test_trace_context_in_bytes_is_read(provider, exporter):
    sync, _ = stacks(provider)
    sent = message()
    sync.publish([sent], confirmed)
    ctx = delivered(sent)
    ctx.headers["traceparent"] = ctx.headers["traceparent"].encode()
    with handling(ctx):
        sync.handle(lambda m, c: None, None, ctx)
    [process] = only(exporter, SpanKind.CONSUMER)
    assert process.parent is not None


def test_a_failed_handler_marks_its_span_and_a_retry_links_to_the_first_attempt(provider, exporter):
    sync, _ = stacks(provider)
    sent = message()
    sync.publish([sent], confirmed)

    def failing(m: object, c: Context) -> None:
        raise ValueError("card declined")

    first = delivered(sent)
    with handling(first) as scope, pytest.raises(ValueError):
        sync.handle(failing, None, first)
    [attempt_1] = only(exporter, SpanKind.CONSUMER)
    assert attempt_1.status.status_code == StatusCode.ERROR
    assert attempt_1.attributes is not None and attempt_1.attributes["error.type"] == "ValueError"
    assert attempt_1.context is not None
    # the retry copy carries the first attempt's span, beside the original traceparent
    first_header = scope.copy_headers[FIRST_ATTEMPT]
    assert first_header.split("-")[2] == f"{attempt_1.context.span_id:016x}"
    retried = delivered(sent, attempt=2)
    retried.headers[FIRST_ATTEMPT] = first_header
    with handling(retried) as again, pytest.raises(mqkit.Reject):
        sync.handle(lambda m, c: (_ for _ in ()).throw(mqkit.Reject("no")), None, retried)
    assert again.copy_headers == {}  # the copy already names the first attempt
    attempt_2 = only(exporter, SpanKind.CONSUMER)[1]
    assert attempt_2.attributes is not None
    assert attempt_2.attributes["mqkit.attempt"] == 2
    assert attempt_1.attributes is not None and "mqkit.attempt" not in attempt_1.attributes
    assert attempt_2.attributes["error.type"] == "Reject"
    [link] = attempt_2.links
    assert link.context.span_id == attempt_1.context.span_id
    assert link.attributes is not None and link.attributes["mqkit.link"] == "first_attempt"
    producer = only(exporter, SpanKind.PRODUCER)[0]
    assert attempt_2.parent is not None and producer.context is not None
    assert attempt_2.parent.span_id == producer.context.span_id  # same trace, same parent


async def test_a_failed_async_handler_marks_its_span(provider, exporter):
    _, async_stack = stacks(provider)
    ctx = Context(message_id="m", correlation_id=None, queue="orders", headers={})

    async def failing(m: object, c: Context) -> None:
        raise KeyError("sku")

    with handling(ctx) as scope, pytest.raises(KeyError):
        await async_stack.handle_async(failing, None, ctx)
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["error.type"] == "KeyError"
    assert FIRST_ATTEMPT in scope.copy_headers


def test_a_garbled_first_attempt_header_is_ignored(provider, exporter):
    sync, _ = stacks(provider)
    ctx = Context(
        message_id="m", correlation_id=None, queue="orders", headers={FIRST_ATTEMPT: "nonsense"}
    )
    with handling(ctx):
        sync.handle(lambda m, c: None, None, ctx)
    [span] = exporter.get_finished_spans()
    assert list(span.links) == []


def test_the_global_provider_is_the_default():
    assert repr(TracingMiddleware()) == "TracingMiddleware()"


@pytest.mark.parametrize("sampled", [True, False])
def test_the_headers_are_what_the_global_propagator_writes(sampled):
    """mqkit writes traceparent itself under the W3C propagators: the same text theirs
    writes, sampled or not, with the span's tracestate; with baggage, the propagator writes."""
    from opentelemetry import baggage, context, propagate
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    sync, _ = stacks(provider)
    parent = SpanContext(
        0x1234,
        0x5678,
        is_remote=True,
        trace_flags=TraceFlags(int(sampled)),
        trace_state=TraceState([("vendor", "v1")]),
    )
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        sent = message()
        sync.publish([sent], confirmed)
        expected: dict[str, str] = {}
        propagate.inject(expected, context=trace.set_span_in_context(_span_of(sent)))
        assert {k: sent.headers[k] for k in expected} == expected
        assert sent.headers["tracestate"] == "vendor=v1"
        assert sent.headers["traceparent"].endswith("-01" if sampled else "-00")
        with_baggage = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            carried = message()
            sync.publish([carried], confirmed)
        finally:
            context.detach(with_baggage)
        assert carried.headers["baggage"] == "tenant=acme"
    finally:
        context.detach(token)


def _span_of(sent: Outgoing) -> Any:
    """A span with the context ``sent``'s traceparent names (to run the propagator on)."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    _, trace_id, span_id, flags = sent.headers["traceparent"].split("-")
    state = TraceState.from_header([sent.headers["tracestate"]])
    return NonRecordingSpan(
        SpanContext(int(trace_id, 16), int(span_id, 16), False, TraceFlags(int(flags, 16)), state)
    )


def test_an_unsampled_delivery_gets_no_attributes_beyond_its_start(exporter):
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sync, _ = stacks(provider)
    sent = message()
    sync.publish([sent], confirmed)
    ctx = delivered(sent)
    with handling(ctx):
        sync.handle(lambda m, c: None, None, ctx)
    assert exporter.get_finished_spans() == ()
    flags = int(sent.headers["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 1 == 0  # not sampled: the decision travels on


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
        {"traceparent": " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03\t"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"},
        {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"},
        {"traceparent": "garbage"},
        {"traceparent": 42},
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=v1",
        },
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "baggage": "tenant=acme",
        },
    ],
)
def test_the_parent_is_what_the_global_propagator_reads(headers):
    """mqkit reads a plain traceparent itself under the W3C propagators: the same context
    theirs reads, for every header a sender could write."""
    from opentelemetry import baggage, propagate

    from mqkit.observability.tracing import _GETTER

    ours = TracingMiddleware(TracerProvider())._parent(headers)
    theirs = propagate.extract(headers, getter=_GETTER)
    assert trace.get_current_span(ours).get_span_context() == (
        trace.get_current_span(theirs).get_span_context()
    )
    assert baggage.get_all(ours) == baggage.get_all(theirs)
