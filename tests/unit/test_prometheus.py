"""PrometheusMiddleware without a broker: what each hook and event records, with which
labels, bounded; several middlewares on one registry."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel

from mqkit import lifecycle as lc
from mqkit.context import Context
from mqkit.correlation import handling
from mqkit.errors import PublishTimeout, PublishUnroutable
from mqkit.messages import encode
from mqkit.middleware import MiddlewareStack, Outgoing
from mqkit.observability import PrometheusMiddleware
from mqkit.observability.prometheus import METRICS


class Order(BaseModel):
    order_id: str


class Placed(BaseModel):
    order_id: str


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def outgoing(model: BaseModel, exchange: str = "", key: str = "orders") -> Outgoing:
    return Outgoing(encode(model, service="shop"), exchange, key)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_every_metric_is_exported_with_the_mqkit_prefix(registry):
    PrometheusMiddleware(registry)
    text = generate_latest(registry).decode()
    for name in METRICS:
        assert name.startswith("mqkit_")
        assert f"# TYPE {name} " in text
    assert "mqkit_messages_published_total" in METRICS
    assert "mqkit_messages_consumed_total" in METRICS
    assert {
        "mqkit_handler_duration_seconds",
        "mqkit_publish_confirm_seconds",
        "mqkit_messages_in_flight",
        "mqkit_connection_up",
        "mqkit_reconnects_total",
    } <= set(METRICS)


def test_confirmed_publishes_are_counted_by_exchange_queue_and_type(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="sync")
    messages = [outgoing(Order(order_id="1")), outgoing(Order(order_id="2"))]
    stack.publish(messages, lambda ms: [m.message_id for m in ms])
    stack.publish(
        [outgoing(Placed(order_id="3"), exchange="shop", key="orders.placed")],
        lambda ms: [m.message_id for m in ms],
    )
    published = "mqkit_messages_published_total"
    assert (
        value(registry, published, service="shop", exchange="", queue="orders", event_type="Order")
        == 2
    )
    # an exchange publish: no queue label (its routing key could be anything)
    assert (
        value(registry, published, service="shop", exchange="shop", queue="", event_type="Placed")
        == 1
    )


def test_a_failed_publish_counts_only_the_messages_the_error_names(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="sync")
    messages = [outgoing(Order(order_id="1")), outgoing(Order(order_id="2"))]

    def send(ms: list[Outgoing]) -> list[str]:
        raise PublishUnroutable("no route", unconfirmed=[ms[1].message_id])

    with pytest.raises(PublishUnroutable):
        stack.publish(messages, send)
    labels = {"service": "shop", "exchange": "", "queue": "orders", "event_type": "Order"}
    assert value(registry, "mqkit_messages_published_total", **labels) == 1
    assert (
        value(registry, "mqkit_publish_errors_total", **labels, error_type="PublishUnroutable") == 1
    )


async def test_an_async_publish_that_fails_without_naming_messages_counts_them_all(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="async")

    async def send(ms: list[Outgoing]) -> list[str]:
        raise PublishTimeout("no confirm")

    with pytest.raises(PublishTimeout):
        await stack.publish_async([outgoing(Order(order_id="1"))] * 3, send)
    labels = {"service": "shop", "exchange": "", "queue": "orders", "event_type": "Order"}
    assert value(registry, "mqkit_publish_errors_total", **labels, error_type="PublishTimeout") == 3

    async def ok(ms: list[Outgoing]) -> list[str]:
        return [m.message_id for m in ms]

    await stack.publish_async([outgoing(Order(order_id="2"))], ok)
    assert value(registry, "mqkit_messages_published_total", **labels) == 1


def delivery(queue: str = "orders", event_type: str = "Order") -> lc.Delivery:
    return lc.Delivery(queue=queue, message_id="m", event_type=event_type, service="billing")


def test_outcomes_are_counted_and_handler_time_observed(registry):
    middleware = PrometheusMiddleware(registry)
    pipeline = lc.Pipeline([middleware])
    d = delivery()
    pipeline.emit(lc.Handled(d, seconds=0.02))
    pipeline.emit(lc.Handled(d, seconds=0.04))
    pipeline.emit(lc.Retried(d, delay=1.0, next_attempt=2, error_type="E", error="e", seconds=0.5))
    pipeline.emit(lc.DeadLettered(d, "orders.dlq", "E", "e", seconds=0.1))
    pipeline.emit(lc.DeadLettered(d, "orders.dlq", "Reject", "no", rejected=True, seconds=0.1))
    pipeline.emit(lc.DeadLettered(d, "orders.dlq", "DecodeError", "bad json"))  # never handled
    pipeline.emit(lc.Undecodable(d, "bad json"))
    labels = {"service": "billing", "queue": "orders", "event_type": "Order"}
    consumed = "mqkit_messages_consumed_total"
    assert value(registry, consumed, **labels, outcome="acked") == 2
    assert value(registry, consumed, **labels, outcome="retried") == 1
    assert value(registry, consumed, **labels, outcome="dead_lettered") == 2
    assert value(registry, consumed, **labels, outcome="rejected") == 1
    assert value(registry, "mqkit_handler_duration_seconds_count", **labels) == 5
    assert value(registry, "mqkit_handler_duration_seconds_sum", **labels) == pytest.approx(0.76)
    assert (
        value(registry, "mqkit_messages_undecodable_total", service="billing", queue="orders") == 1
    )


def test_confirm_latency_is_observed_once_per_successful_publish_call(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="sync")

    def slow(ms: list[Outgoing]) -> list[str]:
        time.sleep(0.003)
        return [m.message_id for m in ms]

    messages = [outgoing(Placed(order_id=str(n)), exchange="shop") for n in range(3)]
    stack.publish(messages, slow)
    with pytest.raises(PublishTimeout):
        stack.publish(messages, lambda ms: (_ for _ in ()).throw(PublishTimeout("no")))
    labels = {"service": "shop", "exchange": "shop"}
    assert value(registry, "mqkit_publish_confirm_seconds_count", **labels) == 1
    assert value(registry, "mqkit_publish_confirm_seconds_sum", **labels) >= 0.003
    assert value(registry, "mqkit_publish_confirm_seconds_bucket", **labels, le="0.001") == 0
    assert value(registry, "mqkit_connection_up", service="shop") == 1


def test_in_flight_counts_running_handlers_on_both_runtimes(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="sync")
    ctx = Context(message_id="m", correlation_id=None, queue="orders")
    seen: list[float] = []

    def handler(message: object, c: Context) -> None:
        seen.append(value(registry, "mqkit_messages_in_flight", service="billing", queue="orders"))

    with handling(ctx, service="billing"):
        stack.handle(handler, None, ctx)

    def failing(message: object, c: Context) -> None:
        raise ValueError("boom")

    with handling(ctx, service="billing"), pytest.raises(ValueError):
        stack.handle(failing, None, ctx)
    assert seen == [1.0]
    assert value(registry, "mqkit_messages_in_flight", service="billing", queue="orders") == 0


async def test_in_flight_on_asyncclient(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="async")
    ctx = Context(message_id="m", correlation_id=None, queue="orders")
    seen: list[float] = []

    async def handler(message: object, c: Context) -> None:
        seen.append(value(registry, "mqkit_messages_in_flight", service="billing", queue="orders"))

    with handling(ctx, service="billing"):
        await stack.handle_async(handler, None, ctx)
    assert seen == [1.0]
    assert value(registry, "mqkit_messages_in_flight", service="billing", queue="orders") == 0


def test_the_link_consumers_and_alarms(registry):
    middleware = PrometheusMiddleware(registry)
    emit = middleware.on_event
    up = ("mqkit_connection_up", {"service": "shop"})
    emit(lc.ConsumerAttached("orders", service="shop"))
    assert value(registry, up[0], **up[1]) == 1
    assert value(registry, "mqkit_consumers_attached", service="shop", queue="orders") == 1
    emit(lc.LinkLost("amqp://guest:***@h/", "reset", service="shop"))
    assert value(registry, up[0], **up[1]) == 0
    emit(lc.LinkRestored("amqp://guest:***@h/", reconnects=1, service="shop"))
    assert value(registry, up[0], **up[1]) == 1
    assert value(registry, "mqkit_reconnects_total", service="shop") == 1
    emit(lc.ConsumerDetached("orders", service="shop"))
    assert value(registry, "mqkit_consumers_attached", service="shop", queue="orders") == 0
    emit(lc.PublishingBlocked("low on memory", service="shop"))
    assert value(registry, "mqkit_publishing_blocked", service="shop") == 1
    emit(lc.PublishingUnblocked(service="shop"))
    assert value(registry, "mqkit_publishing_blocked", service="shop") == 0


def test_the_first_connect_sets_connection_up(registry):
    middleware = PrometheusMiddleware(registry)
    middleware.on_event(lc.LinkUp("amqp://guest:***@h/", service="shop"))
    assert value(registry, "mqkit_connection_up", service="shop") == 1
    assert value(registry, "mqkit_reconnects_total", service="shop") == 0


def test_an_event_of_a_subclass_is_recorded_as_its_base(registry):
    class Lost(lc.LinkLost):
        pass

    class Other(lc.LifecycleEvent):
        pass

    middleware = PrometheusMiddleware(registry)
    middleware.on_event(lc.LinkUp("amqp://h/", service="shop"))
    middleware.on_event(Lost("amqp://h/", "reset", service="shop"))
    assert value(registry, "mqkit_connection_up", service="shop") == 0
    middleware.on_event(Other())  # nothing to record


def test_label_values_are_bounded(registry):
    middleware = PrometheusMiddleware(registry, max_label_values=3)
    for n in range(10):  # a publisher sending ten made-up types to one pattern subscriber
        middleware.on_event(lc.Handled(delivery(event_type=f"t{n}")))
    text = generate_latest(registry).decode()
    kept = {f"t{n}" for n in range(10) if f'event_type="t{n}"' in text}
    assert len(kept) == 3
    labels = {"service": "billing", "queue": "orders", "outcome": "acked"}
    assert value(registry, "mqkit_messages_consumed_total", **labels, event_type="other") == 7


def test_generated_queue_names_collapse_and_no_message_id_is_a_label(registry):
    stack = MiddlewareStack([PrometheusMiddleware(registry)], runtime="sync")
    for n in range(5):  # replies go to one reply-to name per caller
        stack.publish(
            [outgoing(Order(order_id=str(n)), key=f"amq.rabbitmq.reply-to.g1h2{n}.x")],
            lambda ms: [m.message_id for m in ms],
        )
    labels = {"service": "shop", "exchange": "", "event_type": "Order"}
    assert (
        value(registry, "mqkit_messages_published_total", **labels, queue="amq.rabbitmq.reply-to")
        == 5
    )
    PrometheusMiddleware(registry).on_event(lc.Handled(delivery(queue="amq.gen-Xyz")))
    text = generate_latest(registry).decode()
    assert "g1h2" not in text and "amq.gen-Xyz" not in text and 'queue="amq.gen"' in text


def test_middlewares_on_one_registry_share_its_metrics(registry):
    first, second = PrometheusMiddleware(registry), PrometheusMiddleware(registry)
    first.on_event(lc.Handled(delivery()))
    second.on_event(lc.Handled(delivery()))
    labels = {"service": "billing", "queue": "orders", "event_type": "Order", "outcome": "acked"}
    assert value(registry, "mqkit_messages_consumed_total", **labels) == 2
    other = CollectorRegistry()
    PrometheusMiddleware(other)
    assert value(other, "mqkit_messages_consumed_total", **labels) == 0


def test_a_registry_that_already_has_a_metric_of_that_name_is_explained():
    registry = CollectorRegistry()
    Counter("mqkit_reconnects", "someone else's", registry=registry)
    with pytest.raises(
        ValueError,
        match=r"already has a metric named 'mqkit_reconnects'.*registry=CollectorRegistry\(\)",
    ):
        PrometheusMiddleware(registry)


def test_the_default_registry_is_prometheus_clients():
    import prometheus_client

    assert PrometheusMiddleware().registry is prometheus_client.REGISTRY
    assert PrometheusMiddleware().registry is prometheus_client.REGISTRY  # twice: no clash
