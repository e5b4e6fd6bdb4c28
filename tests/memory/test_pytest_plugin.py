"""mqkit's pytest plugin (mqkit.testing.pytest_plugin): its fixtures and helpers do what they
say, on the memory broker and, where they touch one, on RabbitMQ."""

from __future__ import annotations

import pika
import pika.exceptions
import pytest
from pydantic import BaseModel

import mqkit
from mqkit.testing.memory import MemoryBroker, memory_broker
from mqkit.testing.pytest_plugin import Names, Recorder, published
from mqkit.urls import memory_name


class Order(BaseModel):
    id: int


class OrderPlaced(mqkit.Event, event_type="plugintest.orders.placed"):
    order_id: int


def existing(url: str, queues: list[str], exchanges: list[str]) -> list[str]:
    """Which of these queues and exchanges exist on the broker at ``url``."""
    found = []
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                channel = connection.channel()
                try:
                    if kind == "queue":
                        channel.queue_declare(name, passive=True)
                    else:
                        channel.exchange_declare(name, passive=True)
                    found.append(name)
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass
    finally:
        connection.close()
    return found


def delete(url: str, names: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
            channel.exchange_delete(name)
    finally:
        connection.close()


def test_mqkit_url_is_a_fresh_memory_broker_by_default(mqkit_url: str) -> None:
    name = memory_name(mqkit_url)
    assert name is not None
    broker = memory_broker(name)
    assert broker.queues() == {}
    with mqkit.Client(url=mqkit_url) as client:
        client.producer(Order, queue="orders").publish(Order(id=1))
    assert published(mqkit_url, "orders", Order) == [Order(id=1)]


def test_each_test_gets_its_own_memory_broker(mqkit_memory: MemoryBroker, mqkit_url: str) -> None:
    assert mqkit_memory.url != mqkit_url
    assert memory_broker(mqkit_memory.name) is mqkit_memory


def test_recorder_waits_and_fails_saying_how_many(mqkit_memory: MemoryBroker) -> None:
    handled = Recorder()
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.producer(Order, queue="orders").publish(Order(id=1))
        with client.consumer("orders", Order, handled):
            assert handled.wait(1) == [Order(id=1)]
            with pytest.raises(pytest.fail.Exception, match=r"handled 1 of 2 messages in 0\.2s"):
                handled.wait(2, timeout=0.2)
    assert handled.contexts[0].attempt == 1


def test_published_on_rabbitmq_leaves_the_messages(
    mqkit_broker_url: str, mqkit_names: Names
) -> None:
    queue = mqkit_names.queue()
    with mqkit.Client(url=mqkit_broker_url, service=mqkit_names.service()) as client:
        client.producer(Order, queue=queue).publish_many([Order(id=1), Order(id=2)])
        assert published(mqkit_broker_url, queue, Order) == [Order(id=1), Order(id=2)]
        assert published(mqkit_broker_url, queue, Order) == [Order(id=1), Order(id=2)]


def test_mqkit_names_deletes_everything_declared_under_its_names(
    mqkit_broker_url: str,
) -> None:
    """What a service named by ``mqkit_names`` declares on RabbitMQ is deleted after the test:
    here a consumer with a retry policy of its own (its retry tiers) and a bus subscription
    (its queue ``<service>.<event>`` and that queue's DLQ). The fixture watches every client
    made during the test and its teardown is ``names.delete(url)``: both done here directly
    to see what it leaves."""
    names = Names()
    service = names.service()
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.5,))
    with mqkit.Client(url=mqkit_broker_url, service=service) as client:
        names.watch(client)  # the fixture watches every client made during the test
        with client.consumer(names.queue(), Order, Recorder(), retry=policy):
            pass
        bus = client.event_bus(service=names.service(), exchange=names.exchange())
        bus.subscribe(OrderPlaced, Recorder())
        with bus:
            pass
        queues = [e.name for e in client.topology if isinstance(e, mqkit.Queue)]
        exchanges = [e.name for e in client.topology if isinstance(e, mqkit.Exchange)]
    assert all(name.startswith(names.base) for name in queues + exchanges)
    names.delete(mqkit_broker_url)
    left = existing(mqkit_broker_url, queues, exchanges)
    try:
        assert left == [], f"mqkit_names left these on the broker: {left}"
    finally:
        delete(mqkit_broker_url, left)


@pytest.mark.parametrize("mqkit_url", ["memory", "rabbitmq"], indirect=True)
def test_mqkit_names_before_mqkit_url_still_cleans_up(mqkit_names: Names, mqkit_url: str) -> None:
    """Fixture order does not matter: mqkit_names resolves the broker before the test, so the
    URL's fixture is torn down after it."""
    queue = mqkit_names.queue()
    with mqkit.Client(url=mqkit_url, service=mqkit_names.service()) as client:
        client.producer(Order, queue=queue).publish(Order(id=1))
        assert published(mqkit_url, queue, Order) == [Order(id=1)]
