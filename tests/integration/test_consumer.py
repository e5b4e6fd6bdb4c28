"""Consumer[T]: typed round trip, Context, concurrency, prefetch, graceful stop.

Recorders are passed as ``recorder.__call__``: the harness makes functions and bound methods
(not callable objects) ``async def`` for AsyncClient.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal

import pika
from conftest import wait_until
from pydantic import BaseModel

import mqkit


class Order(BaseModel):
    order_id: str
    amount: Decimal


class ConsumerOrderPlaced(mqkit.Event, event_type="consumer.orders.placed"):
    order_id: str


def order(i: int) -> Order:
    return Order(order_id=str(i), amount=Decimal(i))


class Tracker:
    """A handler that can be held (``gate``) or slowed (``hold``), counting how many run at
    once. On the async runtime it awaits instead of blocking: handlers run on the loop."""

    def __init__(self, rt, *, gate: threading.Event | None = None, hold: float = 0.0) -> None:
        self.rt = rt
        self.gate = gate
        self.hold = hold
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.entered: list[Order] = []
        self.done: list[Order] = []

    def _enter(self, message: Order) -> None:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.entered.append(message)

    def _exit(self, message: Order) -> None:
        with self.lock:
            self.running -= 1
            self.done.append(message)

    def handler(self):
        if self.rt.is_async:

            async def handle(message, ctx):
                self._enter(message)
                try:
                    deadline = time.monotonic() + 15
                    while self.gate is not None and not self.gate.is_set():
                        if time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.01)
                    if self.hold:
                        await asyncio.sleep(self.hold)
                finally:
                    self._exit(message)

            return handle

        def handle_sync(message, ctx):
            self._enter(message)
            try:
                if self.gate is not None:
                    self.gate.wait(15)
                if self.hold:
                    time.sleep(self.hold)
            finally:
                self._exit(message)

        return handle_sync


def test_round_trip_is_typed(rt, names, collector):
    queue = names.queue()
    received = collector()
    with rt.client() as client:
        producer = client.producer(Order, queue=queue)
        consumer = client.consumer(queue, Order, received.__call__)
        consumer.start()
        try:
            producer.publish(Order(order_id="42", amount=Decimal("9.90")))
            [message] = received.wait(1)
        finally:
            consumer.stop()
    assert isinstance(message, Order)
    assert message == Order(order_id="42", amount=Decimal("9.90"))
    assert isinstance(message.amount, Decimal)


def test_context_fields(rt, names, collector):
    queue = names.queue()
    received = collector()
    with rt.client() as client, client.consumer(queue, Order, received.__call__):
        before = datetime.now(timezone.utc)
        message_id = client.producer(Order, queue=queue).publish(
            order(1), correlation_id="corr-1", headers={"tenant": "acme"}
        )
        received.wait(1)
    [ctx] = received.contexts
    assert isinstance(ctx, mqkit.Context)
    assert ctx.message_id == message_id
    assert ctx.correlation_id == "corr-1"
    assert ctx.headers["tenant"] == "acme"
    assert ctx.attempt == 1
    assert ctx.redelivered is False
    assert ctx.exchange == ""
    assert ctx.routing_key == queue
    assert ctx.queue == queue
    assert ctx.event_type == "Order"
    assert isinstance(ctx.timestamp, datetime)
    assert ctx.timestamp.tzinfo is not None
    assert abs((ctx.timestamp - before).total_seconds()) < 10


def test_context_of_a_message_from_an_exchange(rt, names, collector):
    exchange, queue = names.exchange(), names.queue()
    received = collector()
    with rt.client() as client:
        client.declare(mqkit.Exchange(exchange))
        consumer = client.consumer(queue, ConsumerOrderPlaced, received.__call__)
        consumer.start()
        try:
            client.declare(mqkit.Binding(exchange, queue, "consumer.orders.*"))
            client.producer(ConsumerOrderPlaced, exchange=exchange).publish(
                ConsumerOrderPlaced(order_id="9")
            )
            [event] = received.wait(1)
        finally:
            consumer.stop()
    assert event == ConsumerOrderPlaced(order_id="9")
    [ctx] = received.contexts
    assert ctx.exchange == exchange
    assert ctx.routing_key == "consumer.orders.placed"
    assert ctx.event_type == "consumer.orders.placed"
    assert ctx.queue == queue
    assert ctx.correlation_id is None


def test_queue_value_instead_of_name(rt, names, collector, raw):
    queue = names.queue()
    received = collector()
    classic = mqkit.Queue(queue, type="classic")
    with (
        rt.client(queue_type="quorum") as client,
        client.consumer(classic, Order, received.__call__),
    ):
        client.producer(Order, queue=classic).publish(order(1))
        received.wait(1)
    assert received.contexts[0].queue == queue
    assert raw.exists(f"{queue}.dlq")


def test_concurrency_bounds_handlers_running_at_once(rt, names):
    queue = names.queue()
    tracker = Tracker(rt, hold=0.3)
    with rt.client() as client:
        producer = client.producer(Order, queue=queue)
        producer.publish_many([order(i) for i in range(9)])
        with client.consumer(queue, Order, tracker.handler(), concurrency=3, prefetch=10):
            wait_until(lambda: len(tracker.done) == 9, timeout=15, what="9 handled")
    assert tracker.max_running == 3


def test_concurrency_one_is_serial(rt, names):
    queue = names.queue()
    tracker = Tracker(rt, hold=0.05)
    with rt.client() as client:
        client.producer(Order, queue=queue).publish_many([order(i) for i in range(6)])
        with client.consumer(queue, Order, tracker.handler(), prefetch=10):
            wait_until(lambda: len(tracker.done) == 6, timeout=15, what="6 handled")
    assert tracker.max_running == 1
    # One at a time, in queue order.
    assert [m.order_id for m in tracker.done] == [str(i) for i in range(6)]


def test_prefetch_limits_unacked_deliveries(rt, names, raw):
    queue = names.queue()
    gate = threading.Event()
    tracker = Tracker(rt, gate=gate)
    with rt.client() as client:
        client.producer(Order, queue=queue).publish_many([order(i) for i in range(6)])
        consumer = client.consumer(queue, Order, tracker.handler(), prefetch=2)
        consumer.start()
        try:
            wait_until(lambda: len(tracker.entered) == 1, what="first handler")
            # One in the handler, one prefetched: the other four stay ready in the queue.
            wait_until(lambda: raw.count(queue) == 4, timeout=5, what="4 ready")
            time.sleep(0.3)
            assert raw.count(queue) == 4
            assert len(tracker.entered) == 1
        finally:
            gate.set()
            wait_until(lambda: len(tracker.done) == 6, timeout=15, what="all 6 handled")
            consumer.stop()
    assert raw.count(queue) == 0


def test_stop_is_graceful(rt, names, raw):
    queue = names.queue()
    gate = threading.Event()
    tracker = Tracker(rt, gate=gate)
    with rt.client() as client:
        client.producer(Order, queue=queue).publish_many([order(i) for i in range(5)])
        consumer = client.consumer(queue, Order, tracker.handler(), prefetch=5)
        consumer.start()
        wait_until(lambda: len(tracker.entered) == 1, what="first handler")
        stopper = threading.Thread(target=consumer.stop, daemon=True)
        stopper.start()
        time.sleep(0.3)
        # stop() waits for the in-flight handler...
        assert stopper.is_alive()
        assert tracker.done == []
        gate.set()
        stopper.join(15)
        assert not stopper.is_alive()
        # ...which finished and was acked; the prefetched rest went back to the queue.
        assert [m.order_id for m in tracker.done] == ["0"]
        wait_until(lambda: raw.count(queue) == 4, timeout=5, what="4 back in the queue")
        time.sleep(0.3)
        assert len(tracker.entered) == 1
        consumer.stop()  # idempotent
    remaining = raw.drain(queue)
    assert sorted(json.loads(body)["order_id"] for _, _, body in remaining) == ["1", "2", "3", "4"]


def test_consumer_as_context_manager(rt, names, collector, raw):
    queue = names.queue()
    received = collector()
    with rt.client() as client:
        producer = client.producer(Order, queue=queue)
        with client.consumer(queue, Order, received.__call__):
            producer.publish(order(1))
            received.wait(1)
        # Stopped on exit: nothing more is taken.
        producer.publish(order(2))
        assert received.settle(0.5) == 1
        assert raw.count(queue) == 1


def test_run_blocks_until_stopped(rt, names, collector):
    queue = names.queue()
    received = collector()
    with rt.client() as client:
        consumer = client.consumer(queue, Order, received.__call__)
        runner = threading.Thread(target=consumer.run, daemon=True)
        runner.start()
        client.producer(Order, queue=queue).publish(order(1))
        received.wait(1)
        assert runner.is_alive()
        consumer.stop()
        runner.join(15)
        assert not runner.is_alive()


def test_client_run_starts_consumers_until_stop(rt, names, collector):
    queue = names.queue()
    received = collector()
    with rt.client() as client:
        client.consumer(queue, Order, received.__call__)
        runner = threading.Thread(target=client.run, daemon=True)
        runner.start()
        client.producer(Order, queue=queue).publish(order(1))
        received.wait(1)
        assert runner.is_alive()
        client.stop()
        runner.join(15)
        assert not runner.is_alive()


def test_message_from_a_plain_amqp_client(rt, names, collector, raw):
    queue = names.queue()
    received = collector()
    with rt.client() as client, client.consumer(queue, Order, received.__call__):
        raw.publish(
            queue,
            b'{"order_id": "7", "amount": "1.5"}',
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
        )
        [message] = received.wait(1)
    assert message == Order(order_id="7", amount=Decimal("1.5"))
    [ctx] = received.contexts
    assert ctx.message_id is None
    assert ctx.attempt == 1
    assert ctx.event_type is None
    assert ctx.queue == queue


def test_many_messages_with_concurrency(rt, names, collector):
    queue = names.queue()
    received = collector()
    with rt.client() as client:
        ids = client.producer(Order, queue=queue).publish_many([order(i) for i in range(200)])
        with client.consumer(queue, Order, received.__call__, concurrency=4):
            received.wait(200, timeout=30)
            assert received.settle(0.3) == 200
    assert sorted(c.message_id for c in received.contexts) == sorted(ids)
