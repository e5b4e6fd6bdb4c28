"""EventBus: one queue per (service, subscription), patterns, broadcast, retries.

Event types start with "bus-": the registry maps a type to one class per process, and the
examples define their own "orders.placed".
"""

from __future__ import annotations

import threading
from contextlib import ExitStack

import pytest
from conftest import wait_until

import mqkit


class OrderPlaced(mqkit.Event, event_type="bus-orders.placed"):
    order_id: str


class OrderCancelled(mqkit.Event, event_type="bus-orders.cancelled"):
    order_id: str
    reason: str


class StockMoved(mqkit.Event, event_type="stock.moved"):
    sku: str


class CacheCleared(mqkit.Event, event_type="bus.cache.cleared"):
    key: str


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def test_every_service_gets_each_event_once(rt, names, collector, raw):
    exchange = names.exchange()
    billing, shipping = names.service(), names.service()
    received = {billing: collector(), shipping: collector()}
    with ExitStack() as stack:
        buses = []
        # Two services, two instances each.
        for service in (billing, billing, shipping, shipping):
            client = stack.enter_context(rt.client(service=service))
            bus = client.event_bus(exchange=exchange)
            bus.subscribe(OrderPlaced, received[service].__call__)
            stack.enter_context(bus)
            buses.append(bus)
        ids = [buses[0].publish(OrderPlaced(order_id=str(i))) for i in range(20)]
        for got in received.values():
            got.wait(20, timeout=15)
        for got in received.values():
            assert got.settle(0.5) == 20
        # One durable queue per (service, subscription), shared by the instances.
        assert raw.exists(f"{billing}.bus-orders.placed")
        assert raw.exists(f"{shipping}.bus-orders.placed")
    for got in received.values():
        assert sorted(e.order_id for e in got.messages) == sorted(str(i) for i in range(20))
        assert sorted(c.message_id for c in got.contexts) == sorted(ids)
        ctx = got.contexts[0]
        assert ctx.exchange == exchange
        assert ctx.routing_key == "bus-orders.placed"
        assert ctx.event_type == "bus-orders.placed"


def test_pattern_subscription_decodes_by_type(rt, names, collector):
    exchange = names.exchange()
    received = collector()
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=exchange)
        bus.subscribe("bus-orders.*", received.__call__)
        with bus:
            bus.publish(OrderPlaced(order_id="1"))
            bus.publish(StockMoved(sku="s-1"))  # does not match the pattern
            bus.publish(OrderCancelled(order_id="2", reason="changed mind"))
            received.wait(2)
            assert received.settle(0.5) == 2
    by_type = {type(m): m for m in received.messages}
    assert by_type == {
        OrderPlaced: OrderPlaced(order_id="1"),
        OrderCancelled: OrderCancelled(order_id="2", reason="changed mind"),
    }
    both = {"bus-orders.placed", "bus-orders.cancelled"}
    assert {c.event_type for c in received.contexts} == both
    assert {c.routing_key for c in received.contexts} == both


def test_broadcast_gives_every_instance_a_copy(rt, names, collector):
    exchange, service = names.exchange(), names.service()
    instances = [collector(), collector(), collector()]
    shared = collector()
    with ExitStack() as stack:
        buses = []
        for got in instances:
            client = stack.enter_context(rt.client(service=service))
            bus = client.event_bus(exchange=exchange)
            bus.subscribe(CacheCleared, got.__call__, broadcast=True)
            bus.subscribe(OrderPlaced, shared.__call__)  # competing, for contrast
            stack.enter_context(bus)
            buses.append(bus)
        buses[1].publish(CacheCleared(key="prices"))
        buses[1].publish(CacheCleared(key="stock"))
        buses[2].publish(OrderPlaced(order_id="1"))
        for got in instances:
            got.wait(2)
        shared.wait(1)
        assert shared.settle(0.5) == 1
    for got in instances:
        assert sorted(m.key for m in got.messages) == ["prices", "stock"]


def test_broadcast_queues_go_away_with_the_instance(rt, names, collector):
    exchange, service = names.exchange(), names.service()
    received = collector()
    with rt.client(service=service) as client:
        bus = client.event_bus(exchange=exchange)
        bus.subscribe(CacheCleared, received.__call__, broadcast=True)
        with bus:
            bus.publish(CacheCleared(key="a"))
            received.wait(1)
    # Nobody listens any more: with mandatory=True the event cannot be routed.
    with rt.client(service=service) as client:
        bus = client.event_bus(exchange=exchange)

        def unroutable() -> bool:
            try:
                bus.publish(CacheCleared(key="b"), mandatory=True)
            except mqkit.PublishUnroutable:
                return True
            return False

        wait_until(unroutable, timeout=5, what="the broadcast queue to go away")


def test_broadcast_give_ups_go_to_a_shared_durable_dlq(rt, names, raw):
    exchange, service = names.exchange(), names.service()
    lock = threading.Lock()
    calls: list[tuple[int, int]] = []

    def failing(instance):
        def handle(event, ctx):
            with lock:
                calls.append((instance, ctx.attempt))
            raise RuntimeError(f"cannot clear {event.key}")

        return handle

    # Broadcast queues are temporary: retries happen in process only, give-ups go to one
    # durable DLQ shared by the service's instances.
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,), immediate=1)
    shared_dlq = f"{service}.bus.cache.cleared.dlq"
    with ExitStack() as stack:
        buses = []
        for instance in (1, 2):
            client = stack.enter_context(rt.client(service=service))
            bus = client.event_bus(exchange=exchange)
            bus.subscribe(CacheCleared, failing(instance), broadcast=True, retry=policy)
            stack.enter_context(bus)
            buses.append(bus)
        message_id = buses[0].publish(CacheCleared(key="prices"))
        wait_until(lambda: raw.count(shared_dlq) == 2, timeout=10, what=f"2 in {shared_dlq}")
    dead = raw.drain(shared_dlq)
    assert [props.message_id for _, props, _ in dead] == [message_id, message_id]
    assert all(text(props.headers["x-mqkit-error-type"]) == "RuntimeError" for _, props, _ in dead)
    assert all(int(props.headers["x-mqkit-attempts"]) == 1 for _, props, _ in dead)
    # immediate=1: two calls per instance, all of them attempt 1 (no broker retry).
    assert sorted(calls) == [(1, 1), (1, 1), (2, 1), (2, 1)]


def test_publish_with_no_subscribers_is_fine(rt, names):
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=names.exchange())
        message_id = bus.publish(OrderPlaced(order_id="1"))
        assert isinstance(message_id, str) and message_id
        assert bus.publish(OrderPlaced(order_id="2"), message_id="given") == "given"
        with pytest.raises(mqkit.PublishUnroutable):
            bus.publish(OrderPlaced(order_id="3"), mandatory=True)


def test_decorator_form(rt, names):
    exchange = names.exchange()
    lock = threading.Lock()
    seen: list[str] = []

    def on_placed(event, ctx):
        with lock:
            seen.append(f"placed:{event.order_id}")

    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=exchange)
        decorated = bus.subscribe(OrderPlaced)(on_placed)
        if not rt.is_async:
            assert decorated is on_placed  # a decorator hands the function back

        @bus.subscribe(OrderCancelled)
        def on_cancelled(event, ctx):
            with lock:
                seen.append(f"cancelled:{event.order_id}")

        assert callable(on_cancelled)
        with bus:
            bus.publish(OrderPlaced(order_id="1"))
            bus.publish(OrderCancelled(order_id="2", reason="r"))
            wait_until(lambda: len(seen) == 2, timeout=10, what="both events")
    assert sorted(seen) == ["cancelled:2", "placed:1"]


def test_retry_policy_per_subscription(rt, names, collector, raw):
    exchange, failing_queue, audit_queue = names.exchange(), names.queue(), names.queue()
    attempts: list[int] = []

    def always_fails(event, ctx):
        attempts.append(ctx.attempt)
        raise RuntimeError(f"cannot reserve stock for {event.order_id}")

    audit = collector()
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=exchange)
        bus.subscribe(
            OrderPlaced,
            always_fails,
            queue=failing_queue,
            retry=mqkit.RetryPolicy(max_attempts=2, delays=(0.1,)),
        )
        bus.subscribe("bus-orders.#", audit.__call__, queue=audit_queue)
        with bus:
            message_id = bus.publish(OrderPlaced(order_id="7"))
            wait_until(lambda: raw.count(f"{failing_queue}.dlq") == 1, timeout=10, what="DLQ")
            audit.wait(1)
            assert audit.settle(0.3) == 1
    assert attempts == [1, 2]
    [(_, props, _)] = raw.drain(f"{failing_queue}.dlq")
    assert props.message_id == message_id
    assert int(props.headers["x-mqkit-attempts"]) == 2
    assert text(props.headers["x-mqkit-error-type"]) == "RuntimeError"
    assert text(props.headers["x-mqkit-original-exchange"]) == exchange
    assert text(props.headers["x-mqkit-original-routing-key"]) == "bus-orders.placed"


def test_subscribing_twice_to_the_same_key_needs_a_queue(rt, names, collector):
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=names.exchange())
        bus.subscribe(OrderPlaced, collector().__call__)
        with pytest.raises(mqkit.ConfigError):
            bus.subscribe(OrderPlaced, collector().__call__)
        bus.subscribe(
            OrderPlaced, collector().__call__, queue=names.queue()
        )  # explicit queue: fine


def test_bus_service_override(rt, names, collector, raw):
    exchange, service = names.exchange(), names.service()
    received = collector()
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(service=service, exchange=exchange)
        bus.subscribe(StockMoved, received.__call__)
        with bus:
            bus.publish(StockMoved(sku="s-9"))
            received.wait(1)
            assert raw.exists(f"{service}.stock.moved")
    assert received.messages == [StockMoved(sku="s-9")]
