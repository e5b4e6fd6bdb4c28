"""Producer[T]: confirmed publishes, the wire format a plain AMQP client sees, routing."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from pydantic import BaseModel

import mqkit


class Order(BaseModel):
    order_id: str
    amount: Decimal


class Refund(BaseModel):
    order_id: str


class ProducerOrderPlaced(mqkit.Event, event_type="producer.orders.placed"):
    order_id: str


def test_publish_returns_the_id_once_confirmed(rt, names, raw):
    queue = names.queue()
    with rt.client(service=names.service()) as client:
        producer = client.producer(Order, queue=queue)
        message_id = producer.publish(Order(order_id="1", amount=Decimal("9.90")))
        assert isinstance(message_id, str) and message_id
        # Confirmed means stored: a plain client sees it at once.
        assert raw.count(queue) == 1
        assert producer.publish(Order(order_id="2", amount=Decimal(1)), message_id="mine") == "mine"
        assert raw.count(queue) == 2


def test_producer_declares_the_queue_and_its_dlq(rt, names, raw):
    queue = names.queue()
    with rt.client() as client:
        client.producer(Order, queue=queue).publish(Order(order_id="1", amount=Decimal(1)))
        assert raw.exists(queue)
        assert raw.exists(f"{queue}.dlq")
        assert any(isinstance(e, mqkit.Queue) and e.name == queue for e in client.topology)


def test_wire_format_seen_by_a_plain_client(rt, names, raw):
    queue = names.queue()
    service = names.service()
    with rt.client(service=service) as client:
        before = time.time()
        message_id = client.producer(Order, queue=queue).publish(
            Order(order_id="42", amount=Decimal("9.90")),
            headers={"tenant": "acme", "trace": "t-1"},
            correlation_id="corr-42",
            priority=5,
            expiration=60,
        )
        after = time.time()
    [(method, props, body)] = raw.drain(queue)
    assert json.loads(body) == {"order_id": "42", "amount": "9.90"}
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.message_id == message_id
    assert props.type == "Order"
    assert props.app_id == service
    assert props.correlation_id == "corr-42"
    assert props.headers["tenant"] == "acme"
    assert props.headers["trace"] == "t-1"
    assert props.priority == 5
    assert props.expiration == "60000"
    assert int(before) - 1 <= props.timestamp <= after + 1
    assert method.routing_key == queue
    assert method.exchange == ""


def test_event_type_is_the_type_property(rt, names, raw):
    queue = names.queue()
    with rt.client() as client:
        client.producer(ProducerOrderPlaced, queue=queue).publish(ProducerOrderPlaced(order_id="5"))
    [(_, props, body)] = raw.drain(queue)
    assert props.type == "producer.orders.placed"
    assert json.loads(body) == {"order_id": "5"}
    assert props.correlation_id is None


def test_publish_many_returns_every_id_and_all_arrive(rt, names, raw):
    queue = names.queue()
    orders = [Order(order_id=str(i), amount=Decimal(i)) for i in range(300)]
    with rt.client() as client:
        ids = client.producer(Order, queue=queue).publish_many(orders, headers={"batch": "b1"})
    assert len(ids) == 300 and len(set(ids)) == 300
    got = raw.drain(queue)
    assert len(got) == 300
    assert {props.message_id for _, props, _ in got} == set(ids)
    assert {json.loads(body)["order_id"] for _, _, body in got} == {str(i) for i in range(300)}
    assert all(props.headers["batch"] == "b1" for _, props, _ in got)


def test_publish_many_of_nothing(rt, names):
    with rt.client() as client:
        assert client.producer(Order, queue=names.queue()).publish_many([]) == []


def test_unroutable_publish_names_exchange_and_key(rt, names, raw):
    exchange = names.exchange()
    with rt.client() as client:
        producer = client.producer(
            Order, exchange=mqkit.Exchange(exchange), routing_key="orders.nobody"
        )
        with pytest.raises(mqkit.PublishUnroutable) as info:
            producer.publish(Order(order_id="1", amount=Decimal(1)))
        assert isinstance(info.value, mqkit.PublishError)
        text = str(info.value)
        assert exchange in text
        assert "orders.nobody" in text
        # The producer stays usable after a return.
        queue = names.queue()
        client.declare(mqkit.Queue(queue), mqkit.Binding(exchange, queue, "orders.#"))
        assert producer.publish(Order(order_id="2", amount=Decimal(2)))
    assert raw.count(queue) == 1


def test_wrong_type_is_a_type_error(rt, names, raw):
    queue = names.queue()
    with rt.client() as client:
        producer = client.producer(Order, queue=queue)
        with pytest.raises(TypeError) as info:
            producer.publish({"order_id": "1", "amount": "1"})
        assert "Order" in str(info.value) and "dict" in str(info.value)
        with pytest.raises(TypeError, match="Refund"):
            producer.publish(Refund(order_id="1"))
        assert raw.count(queue) == 0
        with pytest.raises(TypeError):
            producer.publish_many([Order(order_id="1", amount=Decimal(1)), Refund(order_id="2")])


def test_publish_to_an_exchange_producer(rt, names, raw):
    exchange, queue = names.exchange(), names.queue()
    with rt.client() as client:
        client.declare(
            mqkit.Exchange(exchange),
            mqkit.Queue(queue),
            mqkit.Binding(exchange, queue, "orders.#"),
        )
        producer = client.producer(Order, exchange=exchange, routing_key="orders.new")
        producer.publish(Order(order_id="1", amount=Decimal(1)))
        producer.publish(Order(order_id="2", amount=Decimal(2)), routing_key="orders.other")
        with pytest.raises(mqkit.PublishUnroutable):
            producer.publish(Order(order_id="3", amount=Decimal(3)), routing_key="refunds.x")
        # Without a routing key anywhere, an Event is routed by its event_type.
        events = client.producer(ProducerOrderPlaced, exchange=mqkit.Exchange(exchange))
        client.declare(mqkit.Binding(exchange, queue, "producer.orders.placed"))
        events.publish(ProducerOrderPlaced(order_id="4"))
    got = raw.drain(queue)
    assert [(m.exchange, m.routing_key) for m, _, _ in got] == [
        (exchange, "orders.new"),
        (exchange, "orders.other"),
        (exchange, "producer.orders.placed"),
    ]
    assert [json.loads(b)["order_id"] for _, _, b in got] == ["1", "2", "4"]


def test_fanout_exchange_reaches_every_bound_queue(rt, names, raw):
    exchange, first, second = names.exchange(), names.queue(), names.queue()
    with rt.client() as client:
        client.declare(
            mqkit.Exchange(exchange, type="fanout"),
            mqkit.Queue(first),
            mqkit.Queue(second, type="classic"),
            mqkit.Binding(exchange, first, ""),
            mqkit.Binding(exchange, second, ""),
        )
        message_id = client.producer(Order, exchange=exchange).publish(
            Order(order_id="1", amount=Decimal(1))
        )
    for queue in (first, second):
        [(_, props, _)] = raw.drain(queue)
        assert props.message_id == message_id


def test_publish_to_a_missing_exchange_is_a_topology_error(rt, names):
    with rt.client() as client:
        producer = client.producer(Order, exchange=names.exchange(), routing_key="k")
        with pytest.raises(mqkit.TopologyError):
            producer.publish(Order(order_id="1", amount=Decimal(1)))
        # The client recovers: a later publish on a fine queue works.
        assert client.producer(Order, queue=names.queue()).publish(
            Order(order_id="2", amount=Decimal(2))
        )


def test_producer_needs_exactly_one_target(rt, names):
    with rt.client() as client:
        with pytest.raises(mqkit.ConfigError):
            client.producer(Order)
        with pytest.raises(mqkit.ConfigError):
            client.producer(Order, queue=names.queue(), exchange=names.exchange())
