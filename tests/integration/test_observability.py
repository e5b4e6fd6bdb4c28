"""Observability against the real broker, on both runtimes: users' middleware around
publishing and handling, correlation through the bus and RPC, Prometheus metrics scraped over
HTTP while messages flow, OpenTelemetry traces across clients, runtimes, retries,
dead-lettering, replay and RPC, and the log records' fields."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_until
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

import mqkit
from mqkit.correlation import CAUSATION_ID
from mqkit.lifecycle import LifecycleEvent, LinkRestored, LinkUp
from mqkit.observability import PrometheusMiddleware, TracingMiddleware
from mqkit.observability.tracing import FIRST_ATTEMPT
from mqkit.topology import retry_tier_name


class Order(BaseModel):
    order_id: str


class Invoice(BaseModel):
    order_id: str


class Quote(BaseModel):
    sku: str


class Price(BaseModel):
    cents: int


class Invoiced(mqkit.Event, event_type="obs.invoiced"):
    order_id: str


def forwarding(rt: Any, target: Any, make: Callable[[Any, Any], BaseModel]) -> Callable[..., Any]:
    """A handler that publishes ``make(message, ctx)`` with ``target`` (a producer or a bus)
    from inside the handler: a plain function on Client, an ``async def`` on AsyncClient
    (awaiting the async object behind the test's blocking face)."""
    if rt.is_async:
        inner = target.target

        async def handler(message: Any, ctx: Any) -> None:
            await inner.publish(make(message, ctx))

        return handler

    def handler(message: Any, ctx: Any) -> None:
        target.publish(make(message, ctx))

    return handler


# -- middleware ------------------------------------------------------------------------------


class Tenant(mqkit.Middleware):
    """Adds ``x-tenant`` to what it publishes, times handlers, and keeps the events."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.handled: list[tuple[Any, float]] = []
        self.events: list[str] = []
        self._lock = threading.Lock()

    def publish(self, messages, call_next):
        for message in messages:
            message.headers["x-tenant"] = "acme"
        ids = call_next(messages)
        self.published.extend(ids)
        return ids

    async def publish_async(self, messages, call_next):
        for message in messages:
            message.headers["x-tenant"] = "acme"
        ids = await call_next(messages)
        self.published.extend(ids)
        return ids

    def handle(self, message, ctx, call_next):
        started = time.perf_counter()
        try:
            return call_next(message, ctx)
        finally:
            self.handled.append((ctx.headers.get("x-tenant"), time.perf_counter() - started))

    async def handle_async(self, message, ctx, call_next):
        started = time.perf_counter()
        try:
            return await call_next(message, ctx)
        finally:
            self.handled.append((ctx.headers.get("x-tenant"), time.perf_counter() - started))

    def on_event(self, event):
        with self._lock:
            self.events.append(event.name)


def test_a_middleware_adds_headers_wraps_handlers_and_sees_the_events(rt, names, collector):
    queue = names.queue()
    tenant = Tenant()
    received = collector(lambda m, ctx: time.sleep(0.01))
    with rt.client(service=names.service(), middleware=[tenant]) as client:
        producer = client.producer(Order, queue=queue)
        ids = [producer.publish(Order(order_id=str(n))) for n in range(3)]
        client.consumer(queue, Order, received).start()
        received.wait(3)
        wait_until(lambda: tenant.events.count("handled") == 3, what="three handled events")
    assert tenant.published == ids
    assert [ctx.headers["x-tenant"] for ctx in received.contexts] == ["acme"] * 3
    assert [t for t, _ in tenant.handled] == ["acme"] * 3
    assert all(seconds >= 0.01 for _, seconds in tenant.handled)
    assert "consumer_attached" in tenant.events and "consumer_detached" in tenant.events


class Forgive(mqkit.Middleware):
    """A KeyError is acked (the item is gone anyway); anything else is rejected at once."""

    def handle(self, message, ctx, call_next):
        try:
            return call_next(message, ctx)
        except KeyError:
            return None
        except Exception as exc:
            raise mqkit.Reject(f"refused: {exc}") from exc

    async def handle_async(self, message, ctx, call_next):
        try:
            return await call_next(message, ctx)
        except KeyError:
            return None
        except Exception as exc:
            raise mqkit.Reject(f"refused: {exc}") from exc


def test_a_middleware_turns_exceptions_into_other_outcomes(rt, names, raw):
    queue, service = names.queue(), names.service()
    watcher = Tenant()
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(30.0,))
    calls: list[str] = []

    def handler(order: Order, ctx: Any) -> None:
        calls.append(order.order_id)
        if order.order_id == "gone":
            raise KeyError("gone")
        if order.order_id == "bad":
            raise ValueError("bad amount")

    with rt.client(service=service, middleware=[Forgive(), watcher]) as client:
        producer = client.producer(Order, queue=queue)
        for order_id in ("gone", "bad", "fine"):
            producer.publish(Order(order_id=order_id))
        client.consumer(queue, Order, handler, retry=policy).start()
        wait_until(lambda: len(watcher.events) >= 4, what="three outcomes")
        dead = client.dead_letters(queue)
        wait_until(lambda: dead.count() == 1, what="the rejected message in the DLQ")
        [letter] = dead.peek()
    assert sorted(calls) == ["bad", "fine", "gone"]  # each handled once: nothing retried
    assert letter.error_type == "Reject" and letter.error_message == "refused: bad amount"
    assert raw.count(retry_tier_name(service, 30.0)) == 0  # nothing waits to be retried
    assert watcher.events.count("handled") == 2 and watcher.events.count("dead_lettered") == 1


def test_a_middleware_for_the_other_client_is_refused(rt):
    class OnlyClient(mqkit.Middleware):
        def handle(self, message, ctx, call_next):
            return call_next(message, ctx)

    class OnlyAsyncClient(mqkit.Middleware):
        async def handle_async(self, message, ctx, call_next):
            return await call_next(message, ctx)

    wrong = OnlyClient() if rt.is_async else OnlyAsyncClient()
    with pytest.raises(TypeError, match="defines handle"):
        rt.make_client(middleware=[wrong])
    with pytest.raises(TypeError, match=r"takes mqkit\.Middleware objects"):
        rt.make_client(middleware=[print])


# -- correlation -----------------------------------------------------------------------------


def test_a_message_published_in_a_handler_carries_the_correlation_through_the_bus(
    rt, names, collector
):
    queue, exchange = names.queue(), names.exchange()
    invoiced = collector()
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=exchange)
        bus.subscribe(Invoiced, invoiced)
        bus.start()
        relay = forwarding(rt, bus, lambda order, ctx: Invoiced(order_id=order.order_id))
        client.consumer(queue, Order, relay).start()
        producer = client.producer(Order, queue=queue)
        first = producer.publish(Order(order_id="1"), correlation_id="conv-1")
        second = producer.publish(Order(order_id="2"))  # no correlation: its id is passed on
        invoiced.wait(2)
    by_order = {m.order_id: ctx for m, ctx in invoiced.items}
    assert by_order["1"].correlation_id == "conv-1"
    assert by_order["1"].headers[CAUSATION_ID] == first
    assert by_order["2"].correlation_id == second
    assert by_order["2"].headers[CAUSATION_ID] == second


def test_correlation_crosses_rpc_and_request_takes_headers_and_a_correlation_id(rt, names):
    orders, quotes = names.queue(), names.queue()
    seen: list[Any] = []
    answered = threading.Event()

    def quote(q: Quote, ctx: Any) -> Price:
        seen.append(ctx)
        return Price(cents=990)

    with (
        rt.client(service=names.service()) as server,
        rt.client(service=names.service()) as caller,
        server.responder(quotes, Quote, quote),
    ):
        if rt.is_async:
            requester = caller.target

            async def ask(order: Order, ctx: Any) -> None:
                await requester.request(quotes, Quote(sku=order.order_id), Price, timeout=5)
                answered.set()

        else:

            def ask(order: Order, ctx: Any) -> None:
                caller.request(quotes, Quote(sku=order.order_id), Price, timeout=5)
                answered.set()

        caller.consumer(orders, Order, ask).start()
        placed = caller.producer(Order, queue=orders).publish(
            Order(order_id="MUG"), correlation_id="conv-7"
        )
        assert answered.wait(10)
        price = caller.request(
            quotes, Quote(sku="CUP"), Price, headers={"x-tenant": "acme"}, correlation_id="c-9"
        )
    assert price == Price(cents=990)
    inside, explicit = seen
    assert inside.correlation_id == "conv-7" and inside.headers[CAUSATION_ID] == placed
    assert explicit.correlation_id == "c-9" and explicit.headers["x-tenant"] == "acme"
    assert CAUSATION_ID not in explicit.headers  # not published from inside a handler


def test_concurrent_requests_with_one_correlation_id_each_get_their_own_reply(rt, names):
    quotes = names.queue()

    def quote(q: Quote, ctx: Any) -> Price:
        time.sleep(0.05)
        return Price(cents=int(q.sku))

    with rt.client(service=names.service()) as server, rt.client() as caller:
        server.responder(quotes, Quote, quote).start()
        if rt.is_async:
            requester = caller.target

            async def all_at_once() -> list[Price]:
                return await asyncio.gather(
                    *(
                        requester.request(quotes, Quote(sku=str(n)), Price, correlation_id="same")
                        for n in range(5)
                    )
                )

            prices = rt.loop.run(all_at_once())
        else:
            prices = [Price(cents=-1)] * 5

            def one(n: int) -> None:
                prices[n] = caller.request(quotes, Quote(sku=str(n)), Price, correlation_id="same")

            threads = [threading.Thread(target=one, args=(n,)) for n in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
    assert [p.cents for p in prices] == [0, 1, 2, 3, 4]


# -- Prometheus ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def metrics_server() -> Iterator[tuple[CollectorRegistry, str]]:
    """A registry of its own, served by prometheus_client's HTTP server on a free port."""
    registry = CollectorRegistry()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield registry, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` over HTTP: each sample's value by (name, labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_are_scraped_over_http_while_messages_flow(rt, names, metrics_server):
    registry, url = metrics_server
    queue, service = names.queue(), names.service()
    during: list[float] = []
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.2,))

    def handler(order: Order, ctx: Any) -> None:
        if order.order_id == "0":  # one scrape while a handler runs
            during.append(
                sample(scrape(url), "mqkit_messages_in_flight", service=service, queue=queue)
            )
        if int(order.order_id) % 5 == 4:
            raise ValueError("card declined")

    middleware = [PrometheusMiddleware(registry)]
    with rt.client(service=service, middleware=middleware) as client:
        producer = client.producer(Order, queue=queue)
        producer.publish_many([Order(order_id=str(n)) for n in range(10)])
        consumer = client.consumer(queue, Order, handler, retry=policy)
        consumer.start()
        dead = client.dead_letters(queue)
        wait_until(lambda: dead.count() == 2, 15, "two dead letters")
        labels = {"service": service, "queue": queue, "event_type": "Order"}
        consumed = "mqkit_messages_consumed_total"
        wait_until(
            lambda: sample(scrape(url), consumed, **labels, outcome="dead_lettered") == 2,
            what="the dead-lettered outcomes on /metrics",
        )
        flowing = scrape(url)
    assert during == [1.0]
    publish = {"service": service, "exchange": "", "queue": queue, "event_type": "Order"}
    assert sample(flowing, "mqkit_messages_published_total", **publish) == 10
    assert sample(flowing, consumed, **labels, outcome="acked") == 8
    assert sample(flowing, consumed, **labels, outcome="retried") == 2
    assert sample(flowing, consumed, **labels, outcome="dead_lettered") == 2
    assert sample(flowing, "mqkit_handler_duration_seconds_count", **labels) == 12
    assert sample(flowing, "mqkit_messages_in_flight", service=service, queue=queue) == 0
    assert sample(flowing, "mqkit_consumers_attached", service=service, queue=queue) == 1
    assert sample(flowing, "mqkit_connection_up", service=service) == 1
    confirms = {"service": service, "exchange": ""}
    assert sample(flowing, "mqkit_publish_confirm_seconds_count", **confirms) == 1
    after = scrape(url)  # the client closed: its consumer is detached
    assert sample(after, "mqkit_consumers_attached", service=service, queue=queue) == 0
    assert not any("message_id" in dict(labels) for _, labels in after)


def test_the_first_connect_is_an_event_logged_at_info_that_sets_connection_up(
    rt, names, metrics_server, caplog
):
    registry, url = metrics_server
    service = names.service()
    seen: list[LifecycleEvent] = []

    class Events(mqkit.Middleware):
        def on_event(self, event):
            seen.append(event)

    caplog.set_level(logging.INFO, logger="mqkit.connection")
    middleware = [PrometheusMiddleware(registry), Events()]
    with rt.client(service=service, middleware=middleware):  # connects; publishes nothing
        up = scrape(url)
    assert sample(up, "mqkit_connection_up", service=service) == 1
    assert sample(up, "mqkit_reconnects_total", service=service) == 0
    first = [e for e in seen if isinstance(e, LinkUp)]
    assert first and all(e.service == service and ":guest@" not in e.url for e in first), seen
    assert not any(isinstance(e, LinkRestored) for e in seen)
    records = [r for r in caplog.records if getattr(r, "mqkit_event", None) == "link_up"]
    assert records and all(
        (r.name, r.levelno, r.service) == ("mqkit.connection", logging.INFO, service)
        for r in records
    )
    assert records[0].getMessage() == f"connected to {first[0].url}"


# -- tracing ---------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def finished(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == kind]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def test_one_trace_crosses_two_services(rt, names, spans, collector):
    provider, exporter = spans
    orders, invoices = names.queue(), names.queue()
    done = collector()
    tracer = provider.get_tracer("test")
    with (
        rt.client(service=names.service(), middleware=[TracingMiddleware(provider)]) as shop,
        rt.client(service=names.service(), middleware=[TracingMiddleware(provider)]) as billing,
    ):
        forward = billing.producer(Invoice, queue=invoices)
        billing.consumer(
            orders, Order, forwarding(rt, forward, lambda o, c: Invoice(order_id=o.order_id))
        ).start()
        billing.consumer(invoices, Invoice, done).start()
        producer = shop.producer(Order, queue=orders)
        with tracer.start_as_current_span("checkout") as checkout:
            producer.publish(Order(order_id="42"))
        done.wait(1)
        wait_until(lambda: len(finished(exporter, SpanKind.CONSUMER)) == 2, what="two spans")
    publish_order, publish_invoice = sorted(
        finished(exporter, SpanKind.PRODUCER), key=lambda s: s.start_time or 0
    )
    process_order, process_invoice = sorted(
        finished(exporter, SpanKind.CONSUMER), key=lambda s: s.start_time or 0
    )
    root = checkout.get_span_context()
    assert {trace_id(s) for s in exporter.get_finished_spans()} == {root.trace_id}
    assert parent_of(publish_order) == root.span_id
    assert parent_of(process_order) == span_id(publish_order)
    assert parent_of(publish_invoice) == span_id(process_order)
    assert parent_of(process_invoice) == span_id(publish_invoice)
    assert publish_order.name == f"publish {orders}" and process_order.name == f"process {orders}"
    assert process_invoice.attributes is not None
    assert process_invoice.attributes["messaging.system"] == "rabbitmq"
    assert process_invoice.attributes["messaging.destination.subscription.name"] == invoices


def test_a_trace_crosses_the_runtimes(broker_url, names, spans):
    """Client publishes, AsyncClient consumes, and back."""
    provider, exporter = spans
    there, back = names.queue(), names.queue()
    tracer = provider.get_tracer("test")
    got_back = threading.Event()

    async def main() -> None:
        async with mqkit.AsyncClient(
            url=broker_url, service=names.service(), middleware=[TracingMiddleware(provider)]
        ) as async_client:
            reply = await async_client.producer(Invoice, queue=back)

            async def relay(order: Order, ctx: Any) -> None:
                await reply.publish(Invoice(order_id=order.order_id))

            consumer = async_client.consumer(there, Order, relay)
            await consumer.start()
            with mqkit.Client(
                url=broker_url, service=names.service(), middleware=[TracingMiddleware(provider)]
            ) as client:
                client.consumer(back, Invoice, lambda m, c: got_back.set()).start()
                with tracer.start_as_current_span("checkout"):
                    await asyncio.to_thread(
                        client.producer(Order, queue=there).publish, Order(order_id="1")
                    )
                assert await asyncio.to_thread(got_back.wait, 10)
                await asyncio.to_thread(
                    wait_until,
                    lambda: len(finished(exporter, SpanKind.CONSUMER)) == 2,
                    10,
                    "both consumer spans",
                )

    asyncio.run(main())
    kinds = [
        (s.kind, s.name)
        for s in sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    ]
    assert kinds == [
        (SpanKind.INTERNAL, "checkout"),
        (SpanKind.PRODUCER, f"publish {there}"),
        (SpanKind.CONSUMER, f"process {there}"),
        (SpanKind.PRODUCER, f"publish {back}"),
        (SpanKind.CONSUMER, f"process {back}"),
    ]
    ordered = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert len({trace_id(s) for s in ordered}) == 1
    for child, parent in zip(ordered[1:], ordered[:-1], strict=True):
        assert parent_of(child) == span_id(parent)


def test_a_trace_crosses_retries_dead_lettering_and_replay(rt, names, spans):
    provider, exporter = spans
    queue = names.queue()
    failing = threading.Event()
    failing.set()

    def handler(order: Order, ctx: Any) -> None:
        if failing.is_set():
            raise ValueError("card declined")

    tracer = provider.get_tracer("test")
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.2,))
    with rt.client(service=names.service(), middleware=[TracingMiddleware(provider)]) as client:
        client.consumer(queue, Order, handler, retry=policy).start()
        with tracer.start_as_current_span("checkout"):
            client.producer(Order, queue=queue).publish(Order(order_id="1"))
        dead = client.dead_letters(queue)
        wait_until(lambda: dead.count() == 1, 15, "the dead letter")
        [letter] = dead.peek()
        failing.clear()
        assert dead.replay() == 1
        wait_until(lambda: len(finished(exporter, SpanKind.CONSUMER)) == 3, what="the replay")
    [publish] = finished(exporter, SpanKind.PRODUCER)  # copies and replays are mqkit's own
    first, second, replayed = sorted(
        finished(exporter, SpanKind.CONSUMER), key=lambda s: s.start_time or 0
    )
    assert {trace_id(s) for s in (publish, first, second, replayed)} == {trace_id(publish)}
    assert all(parent_of(s) == span_id(publish) for s in (first, second, replayed))
    attempts = [(s.attributes or {}).get("mqkit.attempt", 1) for s in (first, second, replayed)]
    assert attempts == [1, 2, 1]  # a replay starts afresh
    assert first.status.status_code == second.status.status_code == StatusCode.ERROR
    assert replayed.status.status_code == StatusCode.UNSET
    assert first.links == ()
    for later in (second, replayed):
        [link] = later.links
        assert link.context.span_id == span_id(first)
    assert FIRST_ATTEMPT in letter.headers


def test_a_trace_crosses_rpc_request_and_reply(rt, names, spans):
    provider, exporter = spans
    quotes = names.queue()
    tracer = provider.get_tracer("test")
    tracing = TracingMiddleware(provider)
    with (
        rt.client(service=names.service(), middleware=[tracing]) as server,
        rt.client(service=names.service(), middleware=[tracing]) as caller,
        server.responder(quotes, Quote, lambda q, ctx: Price(cents=990)),
        tracer.start_as_current_span("checkout") as checkout,
    ):
        assert caller.request(quotes, Quote(sku="MUG"), Price, timeout=5) == Price(cents=990)
    request, reply = sorted(finished(exporter, SpanKind.PRODUCER), key=lambda s: s.start_time or 0)
    [process] = finished(exporter, SpanKind.CONSUMER)
    assert parent_of(request) == checkout.get_span_context().span_id
    assert parent_of(process) == span_id(request)
    assert parent_of(reply) == span_id(process)
    assert reply.name == "publish amq.rabbitmq.reply-to"
    assert request.attributes is not None and process.attributes is not None
    conversation = "messaging.message.conversation_id"
    assert request.attributes[conversation] == process.attributes[conversation]


def test_no_duplicate_spans_with_the_pika_and_aio_pika_instrumentations(
    rt, names, spans, collector
):
    from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
    from opentelemetry.instrumentation.pika import PikaInstrumentor

    provider, exporter = spans
    queue = names.queue()
    received = collector()
    pika_instrumentor, aio_instrumentor = PikaInstrumentor(), AioPikaInstrumentor()
    pika_instrumentor.instrument(tracer_provider=provider)
    aio_instrumentor.instrument(tracer_provider=provider)
    try:
        tracing = [TracingMiddleware(provider)]
        with rt.client(service=names.service(), middleware=tracing) as client:
            client.consumer(queue, Order, received).start()
            client.producer(Order, queue=queue).publish(Order(order_id="1"))
            received.wait(1)
            wait_until(lambda: finished(exporter, SpanKind.CONSUMER), what="the consumer span")
            time.sleep(0.2)  # anything else would have ended by now
    finally:
        pika_instrumentor.uninstrument()
        aio_instrumentor.uninstrument()
    scopes = {
        s.instrumentation_scope.name
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope
    }
    assert scopes == {"mqkit"}
    [publish] = finished(exporter, SpanKind.PRODUCER)
    [process] = finished(exporter, SpanKind.CONSUMER)
    assert parent_of(process) == span_id(publish)
    [(_, ctx)] = received.items
    assert ctx.headers["traceparent"].split("-")[2] == f"{span_id(publish):016x}"


# -- logs ------------------------------------------------------------------------------------


def test_log_records_carry_their_fields_and_tracebacks_come_at_debug(rt, names, caplog):
    queue, service = names.queue(), names.service()
    attempts: list[int] = []

    def handler(order: Order, ctx: Any) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ValueError("card declined")

    caplog.set_level(logging.DEBUG, logger="mqkit")
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.2,))
    with rt.client(service=service) as client:
        client.consumer(queue, Order, handler, retry=policy).start()
        message_id = client.producer(Order, queue=queue).publish(
            Order(order_id="1"), correlation_id="conv-3"
        )
        wait_until(
            lambda: any(getattr(r, "mqkit_event", None) == "handled" for r in caplog.records),
            15,
            "the handled record",
        )
    records = [r for r in caplog.records if getattr(r, "message_id", None) == message_id]
    retried = next(r for r in records if r.mqkit_event == "retried")
    assert (retried.name, retried.levelno) == ("mqkit.retry", logging.WARNING)
    for field, value in {
        "queue": queue,
        "service": service,
        "attempt": 1,
        "correlation_id": "conv-3",
        "event_type": "Order",
        "error_type": "ValueError",
        "next_attempt": 2,
    }.items():
        assert getattr(retried, field) == value, field
    assert "Traceback" not in retried.getMessage() and retried.exc_info is None
    tracebacks = [
        r for r in caplog.records if r.getMessage().startswith(f"traceback of {message_id}")
    ]
    assert [r.levelno for r in tracebacks] == [logging.DEBUG]
    handled = next(r for r in records if r.mqkit_event == "handled")
    assert (handled.levelno, handled.attempt) == (logging.DEBUG, 2)
    noisy = [
        r.name for r in caplog.records if r.name.split(".")[0] in ("pika", "aiormq", "aio_pika")
    ]
    assert noisy == []


# -- the example services --------------------------------------------------------------------


class ExampleQuote(BaseModel, extra="allow"):
    """examples.models.PriceQuote on the wire (the examples are not importable from here)."""

    customer: str
    items: list[dict[str, Any]]


class ExamplePrice(BaseModel, extra="allow"):
    total: float


def test_an_example_service_serves_its_metrics(broker_url, names, tmp_path):
    """``python -m examples.pricing`` with ``DEMO_METRICS_PORT`` (as docker-compose.yml runs
    it) answers a quote and shows it on /metrics."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    port, topology = free_port(), tmp_path / "topology"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQKIT_")}
    env.update(
        MQKIT_URL=broker_url,
        DEMO_PREFIX=f"{names.base}-",
        DEMO_TOPOLOGY_FILE=str(topology),
        DEMO_METRICS_PORT=str(port),
        PYTHONPATH=str(root),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.pricing"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "ready" in process.stdout.readline()
        with mqkit.Client(url=broker_url) as client:  # the example's messages, as JSON
            quote = ExampleQuote(customer="ada", items=[{"sku": "MUG", "quantity": 2}])
            price = client.request(f"{names.base}-pricing.quotes", quote, ExamplePrice)
        assert price.total > 0
        url = f"http://127.0.0.1:{port}/metrics"
        labels = {"service": "pricing", "queue": f"{names.base}-pricing.quotes"}
        wait_until(
            lambda: (
                sample(
                    scrape(url),
                    "mqkit_messages_consumed_total",
                    **labels,
                    event_type="ExampleQuote",
                    outcome="acked",
                )
                == 1
            ),
            what="the quote on the service's /metrics",
        )
        samples = scrape(url)
        assert sample(samples, "mqkit_consumers_attached", **labels) == 1
        assert sample(samples, "mqkit_connection_up", service="pricing") == 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
            lines = topology.read_text().splitlines() if topology.exists() else []
            _delete_queues(broker_url, [line[6:] for line in lines if line.startswith("queue ")])
    assert process.returncode == 0


def _delete_queues(url: str, queues: list[str]) -> None:
    """Delete what a service process declared (the suite's clean-up does not see it)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for queue in queues:
            channel = connection.channel()
            channel.queue_delete(queue)
            channel.close()
    finally:
        connection.close()
