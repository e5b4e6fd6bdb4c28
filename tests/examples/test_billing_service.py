"""The demo's billing service (examples/billing.py) tested the way a user of mqkit would test
theirs: with mqkit's pytest plugin, the same test on the in-memory broker and on RabbitMQ.

On memory the retries the service's policy holds for 0.5 s and 1 s come back on the
broker's virtual clock (``run_until_idle``); on RabbitMQ the test waits for them.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from pathlib import Path

import pika
import pytest

import mqkit
from mqkit.testing.memory import memory_broker
from mqkit.testing.pytest_plugin import Names, Recorder
from mqkit.urls import memory_name

# The examples are a package beside mqkit, not installed with it (see test_examples.py).
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.billing import (  # noqa: E402
    DECLINING_CARD,
    EXPIRED_CARD,
    RETRY,
    Billing,
    PaymentGateway,
)
from examples.models import ChargeCard, OrderPaid, PaymentFailed  # noqa: E402

GOOD_CARD = "4242-4242-4242-4242"


def charge(order_id: str, card: str) -> ChargeCard:
    return ChargeCard(order_id=order_id, customer="ada", card=card, amount=Decimal("25.00"))


def wait_for(what: str, check: object, timeout: float = 15.0) -> None:
    """Poll ``check()`` until it is true (RabbitMQ only: the memory broker has settled)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout}s")
        time.sleep(0.05)


def delete_declared(url: str, topology: tuple[object, ...]) -> None:
    """Delete every queue and exchange in a client's ``topology`` from the broker at ``url``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for entity in topology:
            if isinstance(entity, mqkit.Queue):
                channel.queue_delete(entity.name)
            elif isinstance(entity, mqkit.Exchange):
                channel.exchange_delete(entity.name)
    finally:
        connection.close()


@pytest.mark.parametrize("mqkit_url", ["memory", "rabbitmq"], indirect=True)
def test_billing_charges_retries_and_dead_letters(mqkit_url: str, mqkit_names: Names) -> None:
    broker = memory_broker(name) if (name := memory_name(mqkit_url)) is not None else None
    queue, events = mqkit_names.queue(), mqkit_names.exchange()
    tried: list[tuple[str, int]] = []
    paid, failed = Recorder(), Recorder()  # what another service on the bus sees
    client = mqkit.Client(url=mqkit_url, service=mqkit_names.service())
    try:
        with client:
            billing = Billing(client.event_bus(exchange=events), PaymentGateway())

            def on_charge(command: ChargeCard, ctx: mqkit.Context) -> None:
                tried.append((command.order_id, ctx.attempt))
                billing.on_charge(command, ctx)

            watcher = client.event_bus(service=mqkit_names.service(), exchange=events)
            watcher.subscribe(OrderPaid, paid)
            watcher.subscribe(PaymentFailed, failed)
            with watcher, client.consumer(queue, ChargeCard, on_charge, retry=RETRY):
                started = time.monotonic()
                client.producer(ChargeCard, queue=queue).publish_many(
                    [
                        charge("ORD-1", GOOD_CARD),
                        charge("ORD-2", DECLINING_CARD),
                        charge("ORD-3", EXPIRED_CARD),
                    ]
                )
                if broker is not None:
                    broker.run_until_idle()  # the 0.5 s and 1 s retries, on the virtual clock
                    assert time.monotonic() - started < 1.0
                dead = client.dead_letters(queue)
                paid.wait(1)
                failed.wait(2)
                wait_for("two dead letters", lambda: dead.count() == 2)
                letters = {
                    ChargeCard.model_validate_json(letter.body).order_id: letter
                    for letter in dead.peek(10)
                }
                authorization = billing.gateway.charged["ORD-1"]
    finally:
        if broker is None:
            # mqkit_names deletes what it named, with the DLQs and the default policy's retry
            # tiers of its services, but not a subscription's bus queue (<service>.<event>)
            # nor the tiers of billing's own RETRY (<service>.retries.500ms).
            delete_declared(mqkit_url, client.topology)

    assert paid.messages == [
        OrderPaid(
            order_id="ORD-1", customer="ada", amount=Decimal("25.00"), authorization=authorization
        )
    ]
    reasons = {event.order_id: event.reason for event in failed.messages}
    assert reasons == {
        "ORD-2": "card ****0002 declined by the issuer: do not honor",
        "ORD-3": "card ****0069 has expired",
    }
    # The declining card was tried RETRY.max_attempts times, then dead-lettered; the expired
    # one was dead-lettered at once.
    assert RETRY.max_attempts == 3
    assert sorted(tried) == [("ORD-1", 1), ("ORD-2", 1), ("ORD-2", 2), ("ORD-2", 3), ("ORD-3", 1)]
    assert sorted(letters) == ["ORD-2", "ORD-3"]
    assert (letters["ORD-2"].error_type, letters["ORD-2"].attempts) == ("CardDeclined", 3)
    assert (letters["ORD-3"].error_type, letters["ORD-3"].attempts) == ("Reject", 1)
    assert letters["ORD-2"].original_queue == queue
