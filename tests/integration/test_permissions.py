"""Least privilege: a service whose user may read and write but not configure.

The topology is created by an operator (here: an admin client of mqkit, as a definitions
file or a deploy job would); the service then produces, consumes, retries, dead-letters,
replays and uses the bus with a user that has no configure permission at all, in
``declare="passive"`` mode (nothing declared, only checked) and in the default
``declare="auto"`` (its declares are refused, so what exists is used as it is).
A node of the module's own, so the test broker's users stay as they are.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pika
import pytest
from conftest import wait_until
from pydantic import BaseModel

import mqkit
from mqkit.testing import RabbitNode
from mqkit.topology import retry_tier_name, retry_tiers

FAST = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,))


class Charge(BaseModel):
    order_id: str
    amount: Decimal


class Charged(mqkit.Event, event_type="test.permissions.charged"):
    order_id: str


class Node:
    def __init__(self, node: RabbitNode) -> None:
        self.node = node
        self.admin_url = node.url
        # May read and write everything, configure nothing.
        self.limited_url = node.add_user("limited", "s3cret", configure="", write=".*", read=".*")


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with RabbitNode(f"mqkit-perm-{uuid.uuid4().hex[:4]}") as rabbit:
        yield Node(rabbit)


class Handler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handled: list[str] = []
        self.fail = True

    def function(self):
        def handle(message, ctx):
            if message.order_id.startswith("bad") and self.fail:
                raise ValueError(f"card declined for {message.order_id}")
            with self.lock:
                self.handled.append(message.order_id)

        return handle


@pytest.mark.parametrize("mode", ["passive", "auto"])
def test_produce_consume_retry_dead_letter_and_replay_without_configure(rt, node, mode, caplog):
    queue, service = f"charges-{uuid.uuid4().hex[:6]}", f"svc-{uuid.uuid4().hex[:6]}"
    with rt.client(url=node.admin_url, service=service) as admin:  # the operator's part
        admin.declare(mqkit.Queue(queue))
        # The service's retry tier: an exchange and a queue, bound (as a consumer declares it).
        admin.declare(*retry_tiers(service, FAST.tiers, "quorum"))
    handler = Handler()
    caplog.set_level(logging.WARNING, logger="mqkit")
    try:
        with rt.client(url=node.limited_url, service=service, declare=mode) as client:
            consumer = client.consumer(queue, Charge, handler.function(), retry=FAST)
            consumer.start()
            producer = client.producer(Charge, queue=queue)
            producer.publish(Charge(order_id="good", amount=Decimal(1)))
            producer.publish(Charge(order_id="bad", amount=Decimal(2)))
            dlq = client.dead_letters(queue)
            wait_until(lambda: dlq.count() == 1, timeout=15, what="the declined charge in the DLQ")
            assert handler.handled == ["good"]
            (letter,) = dlq.peek()
            assert letter.attempts == 2 and letter.error_type == "ValueError"
            handler.fail = False
            assert dlq.replay() == 1
            wait_until(lambda: sorted(handler.handled) == ["bad", "good"], what="the replay")
            consumer.stop()
    finally:
        _delete(node, queue, f"{queue}.dlq", retry_tier_name(service, 0.1))
    refused = [r for r in caplog.records if "may not configure" in r.getMessage()]
    if mode == "passive":
        assert refused == []  # passive declares nothing, so nothing is refused
    else:
        assert refused, "auto mode says which declares it could not make"


def test_a_missing_queue_without_configure_permission_says_what_to_do(rt, node):
    queue = f"missing-{uuid.uuid4().hex[:6]}"
    with (
        rt.client(url=node.limited_url) as client,
        pytest.raises(mqkit.TopologyError) as caught,
    ):
        client.producer(Charge, queue=queue)
    text = str(caught.value)
    assert queue in text and "configure permission" in text
    assert "s3cret" not in text


def test_bus_with_an_existing_exchange_and_queue_in_passive_mode(rt, node):
    service = f"svc-{uuid.uuid4().hex[:6]}"
    received: list[str] = []
    with rt.client(url=node.admin_url, service=service) as admin:  # the operator's part
        bus = admin.event_bus()
        bus.subscribe(Charged, lambda event, ctx: None)
        bus.start()  # declares the exchange, the subscription's queues and binding
        bus.stop()
        subscription_queues = [e.name for e in admin.topology if isinstance(e, mqkit.Queue)]
    try:
        with rt.client(url=node.limited_url, service=service, declare="passive") as client:
            bus = client.event_bus()
            bus.subscribe(Charged, lambda event, ctx: received.append(event.order_id))
            bus.start()
            bus.publish(Charged(order_id="42"))
            wait_until(lambda: received == ["42"], what="the event")
            bus.stop()
    finally:
        _delete(node, *subscription_queues)


def _delete(node: Node, *queues: str) -> None:
    """Delete ``queues``, and the exchanges of the same names (a retry tier is both)."""
    connection = pika.BlockingConnection(pika.URLParameters(node.admin_url))
    try:
        for queue in queues:
            connection.channel().queue_delete(queue)
            connection.channel().exchange_delete(queue)
    finally:
        connection.close()
