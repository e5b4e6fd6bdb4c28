"""Queues that already exist: declared by mqkit elsewhere, by another client or by an operator.

mqkit declares a queue the same way whoever comes first (``declare(Queue)``, a producer, a
consumer, a responder, the bus). A queue declared elsewhere in another shape is used as it
is, with one WARNING (``declare="auto"``), refused (``declare="strict"``), or only checked
(``declare="passive"``, for a user without configure permission).
"""

from __future__ import annotations

import logging
import threading
from decimal import Decimal
from typing import Any

import pika
import pytest
from conftest import wait_until
from pydantic import BaseModel

import mqkit
from mqkit.topology import retry_tier_name

FAST = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,))

# Queue shapes other clients or operators declare (raw pika, no mqkit arguments).
SHAPES: dict[str, dict[str, Any]] = {
    "classic-no-dead-lettering": {},
    "quorum-own-delivery-limit": {"x-queue-type": "quorum", "x-delivery-limit": 5},
    "classic-max-length": {"x-max-length": 1000},
}


class Order(BaseModel):
    order_id: str
    amount: Decimal


def order(key: str) -> Order:
    return Order(order_id=key, amount=Decimal(1))


class Handler:
    """Fails every order whose id starts with "bad"; records the others."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handled: list[str] = []
        self.failed: list[tuple[str, int]] = []

    def __call__(self, message: Order, ctx: mqkit.Context) -> None:
        if message.order_id.startswith("bad"):
            with self.lock:
                self.failed.append((message.order_id, ctx.attempt))
            raise ValueError(f"cannot handle {message.order_id}")
        with self.lock:
            self.handled.append(message.order_id)

    def function(self):
        def handle(message, ctx):  # a plain function: the async harness makes it a coroutine
            return self(message, ctx)

        return handle


def raw_declare(url: str, queue: str, arguments: dict[str, Any]) -> None:
    """Declare ``queue`` the way a non-mqkit client would."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue, durable=True, arguments=arguments or None)
    finally:
        connection.close()


def using_existing(caplog: pytest.LogCaptureFixture, queue: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and f"existing queue {queue!r}" in r.getMessage()
    ]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_queue_declared_elsewhere_round_trip_and_dead_letter(rt, names, raw, caplog, shape):
    queue = names.queue()
    raw_declare(rt.broker_url, queue, SHAPES[shape])
    handler = Handler()
    caplog.set_level(logging.WARNING, logger="mqkit")
    with rt.client(service=names.service()) as client:
        producer = client.producer(Order, queue=queue)
        consumer = client.consumer(queue, Order, handler.function(), retry=FAST)
        consumer.start()
        producer.publish(order("good-1"))
        producer.publish(order("bad-1"))
        producer.publish(order("good-2"))
        wait_until(lambda: len(handler.handled) == 2, timeout=10, what="two orders handled")
        wait_until(lambda: raw.count(f"{queue}.dlq") == 1, timeout=10, what="one dead letter")
        consumer.stop()
        (letter,) = client.dead_letters(queue).peek()
    assert sorted(handler.handled) == ["good-1", "good-2"]
    assert [attempt for _, attempt in handler.failed] == [1, 2]  # retried through the broker
    assert letter.error_type == "ValueError"
    assert letter.original_queue == queue
    assert letter.attempts == 2
    assert raw.count(queue) == 0
    # One WARNING, naming the queue and what mqkit cannot guarantee there.
    (warning,) = using_existing(caplog, queue)
    assert "will not park a message" in warning
    assert "declare='strict'" in warning


def test_responder_on_a_queue_declared_elsewhere(rt, names, caplog):
    queue = names.queue()
    raw_declare(rt.broker_url, queue, {})
    caplog.set_level(logging.WARNING, logger="mqkit")

    def double(message: Order, ctx: mqkit.Context) -> Order:
        return Order(order_id=message.order_id * 2, amount=message.amount * 2)

    with rt.client(service=names.service()) as client:
        responder = client.responder(queue, Order, double)
        responder.start()
        reply = client.request(queue, order("ab"), Order, timeout=10)
        responder.stop()
    assert reply == Order(order_id="abab", amount=Decimal(2))
    assert len(using_existing(caplog, queue)) == 1


@pytest.mark.parametrize("first", ["declare", "producer", "consumer", "responder"])
def test_every_part_declares_a_queue_the_same_way(rt, names, caplog, first):
    """Whoever declares a queue first, the others agree: no conflict, no warning."""
    queue = names.queue()
    caplog.set_level(logging.WARNING, logger="mqkit")
    handler = Handler()

    def reply(message: Order, ctx: mqkit.Context) -> Order:
        return message

    with rt.client(service=names.service()) as client:
        parts = {
            "declare": lambda: client.declare(mqkit.Queue(queue)),
            "producer": lambda: client.producer(Order, queue=queue),
            "consumer": lambda: client.consumer(queue, Order, handler.function()).start(),
            "responder": lambda: client.responder(queue, Order, reply).start(),
        }
        parts[first]()
    # A second client (another service instance, another process) declares it its own way.
    with rt.client(service=names.service()) as other:
        for name, part in {
            "declare": lambda: other.declare(mqkit.Queue(queue)),
            "producer": lambda: other.producer(Order, queue=queue),
            "consumer": lambda: other.consumer(queue, Order, handler.function()).start(),
            "responder": lambda: other.responder(queue, Order, reply).start(),
        }.items():
            if name != first:
                part()
        other.producer(Order, queue=queue).publish(order("one"))
    assert using_existing(caplog, queue) == []


def test_declare_keeps_the_arguments_a_consumer_then_uses(rt, names, caplog):
    """A queue declared with arguments of the user's choosing is consumed as declared."""
    queue = names.queue()
    handler = Handler()
    caplog.set_level(logging.WARNING, logger="mqkit")
    with rt.client(service=names.service(), queue_type="classic") as client:
        client.declare(mqkit.Queue(queue, arguments={"x-max-length": 50}))
        consumer = client.consumer(queue, Order, handler.function())
        consumer.start()
        client.producer(Order, queue=queue).publish(order("one"))
        wait_until(lambda: handler.handled == ["one"], timeout=10, what="the order handled")
        consumer.stop()
    assert using_existing(caplog, queue) == []


def test_strict_refuses_a_queue_declared_elsewhere(rt, names, raw):
    queue = names.queue()
    raw_declare(rt.broker_url, queue, {})
    with (
        rt.client(service=names.service(), declare="strict") as client,
        pytest.raises(mqkit.TopologyError) as caught,
    ):
        client.consumer(queue, Order, Handler().function()).start()
    text = str(caught.value)
    assert queue in text and "already exists with other arguments" in text
    assert caught.value.reply_code == 406
    assert raw.count(queue) == 0


def test_passive_uses_existing_topology_without_declaring(rt, names, raw):
    queue, service = names.queue(), names.service()
    raw_declare(rt.broker_url, queue, {})
    raw_declare(rt.broker_url, f"{queue}.dlq", {})
    raw_declare_retry_tier(rt.broker_url, service, 0.1)
    handler = Handler()
    with rt.client(service=service, declare="passive") as client:
        consumer = client.consumer(queue, Order, handler.function(), retry=FAST)
        consumer.start()
        producer = client.producer(Order, queue=queue)
        producer.publish(order("good"))
        producer.publish(order("bad"))
        wait_until(lambda: handler.handled == ["good"], timeout=10, what="the good order")
        wait_until(lambda: raw.count(f"{queue}.dlq") == 1, timeout=10, what="a dead letter")
        consumer.stop()
    assert [attempt for _, attempt in handler.failed] == [1, 2]


def test_passive_names_a_missing_queue(rt, names, raw):
    queue = names.queue()
    with (
        rt.client(service=names.service(), declare="passive") as client,
        pytest.raises(mqkit.TopologyError) as caught,
    ):
        client.producer(Order, queue=queue)
    text = str(caught.value)
    assert f"check that queue '{queue}.dlq' exists" in text or f"queue '{queue}'" in text
    assert "declare='passive' declares nothing" in text
    assert caught.value.reply_code == 404
    assert not raw.exists(queue)


def test_a_bad_declare_setting_is_a_config_error():
    with pytest.raises(mqkit.ConfigError) as caught:
        mqkit.Settings(declare="sometimes")
    assert "declare" in str(caught.value)


def raw_declare_retry_tier(url: str, service: str, delay: float) -> None:
    """The retry tier of ``service`` for ``delay`` as an operator would make it: a fanout
    exchange and a queue of that name, bound; the queue's TTL dead-letters each message to
    the default exchange with its own routing key (the work queue's name)."""
    name = retry_tier_name(service, delay)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.exchange_declare(name, exchange_type="fanout", durable=True)
        arguments = {"x-message-ttl": round(delay * 1000), "x-dead-letter-exchange": ""}
        channel.queue_declare(name, durable=True, arguments=arguments)
        channel.queue_bind(name, name)
    finally:
        connection.close()
