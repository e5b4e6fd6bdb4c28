"""Bad input: undecodable bodies, wrong types, invalid settings, wrong credentials,
unreachable brokers, conflicting declares, unknown event types.

Recorders are passed as ``recorder.__call__``: the harness makes functions and bound methods
(not callable objects) ``async def`` for AsyncClient.
"""

from __future__ import annotations

import socket
import time
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from conftest import wait_until
from pydantic import BaseModel

import mqkit


class Order(BaseModel):
    order_id: str
    amount: Decimal


class Refund(BaseModel):
    order_id: str


class BadInputShipped(mqkit.Event, event_type="badinput.shipped"):
    order_id: str


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def json_props(**kwargs) -> pika.BasicProperties:
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, **kwargs)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{this is not json", "not valid JSON"),
        (b'{"order_id": "1", "amount": "a lot"}', "amount"),
        (b'{"amount": "1"}', "order_id"),
        (b"\xff\xfe\xfd", "Order"),
    ],
    ids=["malformed", "invalid-field", "missing-field", "not-utf8"],
)
def test_undecodable_body_is_dead_lettered_and_the_consumer_goes_on(
    rt, names, collector, raw, body, reason
):
    queue = names.queue()
    received = collector()
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,))
    with rt.client() as client, client.consumer(queue, Order, received.__call__, retry=policy):
        raw.publish(queue, body, properties=json_props(message_id="bad-1"))
        wait_until(lambda: raw.count(f"{queue}.dlq") == 1, timeout=10, what="dead letter")
        # The consumer survived: the next good message is handled.
        raw.publish(queue, b'{"order_id": "2", "amount": "2"}', properties=json_props())
        [message] = received.wait(1)
    assert message == Order(order_id="2", amount=Decimal(2))
    [(_, props, dead_body)] = raw.drain(f"{queue}.dlq")
    assert dead_body == body  # kept as it came
    assert props.message_id == "bad-1"
    assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
    assert reason in text(props.headers["x-mqkit-error-message"])
    assert int(props.headers["x-mqkit-attempts"]) == 1  # no retries for a bad body
    assert text(props.headers["x-mqkit-original-queue"]) == queue


def test_wrong_message_type_to_publish_is_a_type_error(rt, names, raw):
    queue = names.queue()
    with rt.client() as client:
        producer = client.producer(Order, queue=queue)
        with pytest.raises(TypeError) as info:
            producer.publish(Refund(order_id="1"))
        assert "Order" in str(info.value) and "Refund" in str(info.value)
        with pytest.raises(TypeError):
            producer.publish("not a model")
    assert raw.count(queue) == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prefetch": 0}, "prefetch"),
        ({"queue_type": "stream-ish"}, "queue_type"),
        ({"confirm_timeout": -1}, "confirm_timeout"),
        ({"url": "http://localhost:5672/"}, "url"),
        ({"servcie": "billing"}, "servcie"),
    ],
)
def test_invalid_settings_via_client_keywords(rt, overrides, field):
    with pytest.raises(mqkit.ConfigError) as info:
        rt.make_client(**overrides)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_invalid_settings_object_plus_keywords(rt):
    settings = mqkit.Settings(service="billing")
    with pytest.raises(mqkit.ConfigError, match="heartbeat"):
        rt.make_client(settings=settings, heartbeat=-3)


def test_wrong_credentials_fail_fast_without_showing_the_password(rt, broker_url):
    parts = urlsplit(broker_url)
    user = parts.username or "guest"
    secret = "wrong-pw-s3cret"
    netloc = f"{user}:{secret}@{parts.hostname}:{parts.port or 5672}"
    url = urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
    started = time.monotonic()
    with pytest.raises(mqkit.ConnectionFailed) as info, rt.client(url=url, connect_timeout=5):
        pass
    elapsed = time.monotonic() - started
    assert elapsed < 5 + 2
    message = str(info.value)
    assert secret not in message
    assert secret not in repr(info.value)
    assert "username or password" in message.lower()
    assert parts.hostname in message


def test_unreachable_host_names_the_host(rt):
    port = closed_port()
    started = time.monotonic()
    url = f"amqp://guest:guest-s3cret@127.0.0.1:{port}/"
    with pytest.raises(mqkit.ConnectionFailed) as info, rt.client(url=url, connect_timeout=1):
        pass
    elapsed = time.monotonic() - started
    assert elapsed < 1 + 2
    message = str(info.value)
    assert "127.0.0.1" in message
    assert "guest-s3cret" not in message and "guest-s3cret" not in repr(info.value)


def test_fail_over_tries_every_url(rt, broker_url, names, collector):
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    queue = names.queue()
    received = collector()
    with rt.client(urls=[dead, broker_url], connect_timeout=10) as client:
        with client.consumer(queue, Order, received.__call__):
            client.producer(Order, queue=queue).publish(Order(order_id="1", amount=Decimal(1)))
            received.wait(1)
        assert client.health().connected


def test_conflicting_queue_declare_is_a_topology_error(rt, names):
    # declare="strict": by default a queue declared in another shape is used as it is.
    queue = names.queue()
    with rt.client(declare="strict") as client:
        client.declare(mqkit.Queue(queue, type="classic"))
        client.declare(mqkit.Queue(queue, type="classic"))  # the same again is fine
        with pytest.raises(mqkit.TopologyError) as info:
            client.declare(mqkit.Queue(queue, type="quorum"))
        message = str(info.value)
        assert queue in message
        assert "x-queue-type" in message
        assert "classic" in message and "quorum" in message
        # The client carries on: the broker closed a channel, mqkit replaced it.
        other = names.queue()
        client.declare(mqkit.Queue(other))
        assert client.producer(Order, queue=other).publish(Order(order_id="1", amount=Decimal(1)))


def test_consumer_on_a_queue_of_another_type_is_a_topology_error(rt, names):
    queue = names.queue()
    with rt.client(queue_type="quorum", declare="strict") as client:
        client.declare(mqkit.Queue(queue, type="classic"))
        consumer = client.consumer(mqkit.Queue(queue, type="quorum"), Order, lambda m, c: None)
        with pytest.raises(mqkit.TopologyError, match=queue):
            consumer.start()


def test_unknown_event_type_on_a_pattern_subscription_is_dead_lettered(rt, names, collector, raw):
    exchange, queue = names.exchange(), names.queue()
    received = collector()
    with rt.client(service=names.service()) as client:
        bus = client.event_bus(exchange=exchange)
        bus.subscribe("badinput.*", received.__call__, queue=queue)
        with bus:
            raw.publish(
                "badinput.unknown",
                b'{"order_id": "1"}',
                exchange=exchange,
                properties=json_props(type="badinput.nobody-defined-this", message_id="u-1"),
            )
            wait_until(lambda: raw.count(f"{queue}.dlq") == 1, timeout=10, what="dead letter")
            bus.publish(BadInputShipped(order_id="2"))
            [event] = received.wait(1)
    assert event == BadInputShipped(order_id="2")
    [(_, props, _)] = raw.drain(f"{queue}.dlq")
    assert props.message_id == "u-1"
    assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
    assert "badinput.nobody-defined-this" in text(props.headers["x-mqkit-error-message"])
