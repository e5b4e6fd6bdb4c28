"""Interop: a message published by one runtime is consumed by the other unchanged.

Not parametrised over runtimes like the rest of the suite: every test here uses both. The
``rt`` fixture is pinned to ``sync`` and its twin is built on the shared event loop.

Recorders are passed as ``recorder.__call__``: the harness makes functions and bound methods
(not callable objects) ``async def`` for AsyncClient.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from conftest import wait_until
from pydantic import BaseModel

import mqkit

pytestmark = pytest.mark.parametrize("rt", ["sync"], indirect=True)

DIRECTIONS = ["sync-to-async", "async-to-sync"]


class Order(BaseModel):
    order_id: str
    amount: Decimal


class InteropShipped(mqkit.Event, event_type="interop.shipped"):
    order_id: str
    carrier: str


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


@pytest.fixture
def runtimes(rt, _loop):
    """``{"sync": ..., "async": ...}``: the same Runtime API for Client and AsyncClient."""
    assert not rt.is_async
    return {"sync": rt, "async": type(rt)("async", rt.url, _loop, rt.broker_url)}


def sides(runtimes, direction: str):
    source, target = direction.split("-to-")
    return runtimes[source], runtimes[target]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_consumed_unchanged(runtimes, direction, names, collector):
    sender, receiver = sides(runtimes, direction)
    queue = names.queue()
    received = collector()
    original = Order(order_id="42", amount=Decimal("9.90"))
    with (
        sender.client(service=names.service()) as out,
        receiver.client() as into,
        into.consumer(queue, Order, received.__call__),
    ):
        message_id = out.producer(Order, queue=queue).publish(
            original,
            correlation_id="corr-42",
            headers={"tenant": "acme", "n": 7},
            priority=3,
        )
        [message] = received.wait(1)
    assert message == original
    assert isinstance(message.amount, Decimal)
    [ctx] = received.contexts
    assert ctx.message_id == message_id
    assert ctx.correlation_id == "corr-42"
    assert ctx.headers["tenant"] == "acme"
    assert ctx.headers["n"] == 7
    assert ctx.attempt == 1
    assert ctx.event_type == "Order"
    assert ctx.queue == queue and ctx.routing_key == queue
    assert ctx.timestamp is not None


def test_both_runtimes_write_the_same_wire_format(runtimes, names, raw):
    queue = names.queue()
    service = names.service()
    for runtime in runtimes.values():
        with runtime.client(service=service) as client:
            client.producer(Order, queue=queue).publish(
                Order(order_id="1", amount=Decimal("1.10")),
                message_id=f"id-{runtime.name}",
                correlation_id="corr",
                headers={"tenant": "acme", "n": 7},
                priority=2,
                expiration=30,
            )
    sync_msg, async_msg = raw.drain(queue)

    def wire(message):
        _, props, body = message
        return {
            "body": json.loads(body),
            "content_type": props.content_type,
            "delivery_mode": props.delivery_mode,
            "type": props.type,
            "app_id": props.app_id,
            "correlation_id": props.correlation_id,
            "headers": props.headers,
            "priority": props.priority,
            "expiration": props.expiration,
        }

    assert wire(sync_msg) == wire(async_msg)
    assert (sync_msg[1].message_id, async_msg[1].message_id) == ("id-sync", "id-async")
    assert abs(sync_msg[1].timestamp - async_msg[1].timestamp) <= 60


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_events_cross_runtimes(runtimes, direction, names, collector):
    sender, receiver = sides(runtimes, direction)
    exchange = names.exchange()
    typed, pattern = collector(), collector()
    with (
        sender.client(service=names.service()) as out,
        receiver.client(service=names.service()) as into,
    ):
        bus = into.event_bus(exchange=exchange)
        bus.subscribe(InteropShipped, typed.__call__)
        bus.subscribe("interop.*", pattern.__call__)
        with bus:
            message_id = out.event_bus(exchange=exchange).publish(
                InteropShipped(order_id="1", carrier="ups"),
                correlation_id="corr-e",
                headers={"tenant": "acme"},
            )
            typed.wait(1)
            pattern.wait(1)
    for got in (typed, pattern):
        assert got.messages == [InteropShipped(order_id="1", carrier="ups")]
        [ctx] = got.contexts
        assert ctx.message_id == message_id
        assert ctx.correlation_id == "corr-e"
        assert ctx.headers["tenant"] == "acme"
        assert ctx.event_type == "interop.shipped"
        assert ctx.exchange == exchange


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_dead_letters_cross_runtimes(runtimes, direction, names):
    """One runtime dead-letters; the other reads the DLQ and replays it."""
    failing, fixing = sides(runtimes, direction)
    queue = names.queue()
    calls: list[tuple[str, int]] = []

    def broken(message, ctx):
        calls.append(("broken", ctx.attempt))
        raise ValueError(f"cannot handle {message.order_id}")

    def fixed(message, ctx):
        calls.append(("fixed", ctx.attempt))

    once = mqkit.RetryPolicy(max_attempts=1)
    with failing.client(service=names.service()) as first, fixing.client() as second:
        with first.consumer(queue, Order, broken, retry=once):
            message_id = first.producer(Order, queue=queue).publish(
                Order(order_id="7", amount=Decimal(7)), correlation_id="corr-d"
            )
            dlq = second.dead_letters(queue)
            wait_until(lambda: dlq.count() == 1, timeout=10, what="dead letter")
        [dead] = dlq.peek()
        assert dead.message_id == message_id
        assert dead.error_type == "ValueError"
        assert dead.error_message == "cannot handle 7"
        assert dead.attempts == 1
        assert dead.original_queue == queue
        with second.consumer(queue, Order, fixed, retry=once):
            assert dlq.replay() == 1
            wait_until(lambda: ("fixed", 1) in calls, timeout=10, what="the replay")
        assert dlq.count() == 0
    assert calls == [("broken", 1), ("fixed", 1)]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rpc_across_runtimes(runtimes, direction, names):
    caller_rt, server_rt = sides(runtimes, direction)
    queue = names.queue()

    def add(request, ctx):
        if request.a < 0:
            raise ValueError("negative")
        return Sum(total=request.a + request.b)

    with (
        server_rt.client() as server,
        caller_rt.client() as caller,
        server.responder(queue, Add, add),
    ):
        assert caller.request(queue, Add(a=2, b=40), Sum, timeout=5) == Sum(total=42)
        with pytest.raises(mqkit.RemoteError) as info:
            caller.request(queue, Add(a=-1, b=0), Sum, timeout=5)
    assert (info.value.error_type, info.value.error_message) == ("ValueError", "negative")
