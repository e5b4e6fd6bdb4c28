"""What the in-memory broker (``memory://NAME``, :mod:`mqkit.testing.memory`) promises, checked
through both clients and through raw pika on ``broker.amqp_url``: routing, returns, confirms,
prefetch and requeues, TTL and dead-lettering, delivery limits, max-length, declare
conflicts, direct reply-to, and the broker's own helpers (count, peek, names, close, logins).

The virtual clock and broker-held retries are in ``test_memory_clock.py``; ``mqkit dlq`` on a
memory URL in ``test_memory_cli.py``.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
import pika.exceptions
import pytest
from pydantic import BaseModel

import mqkit
from mqkit.testing.memory import MemoryBroker, memory_broker
from mqkit.testing.pytest_plugin import Recorder, published


class Order(BaseModel):
    id: int


class Invoice(BaseModel):
    order_id: int
    total: int


class Quote(BaseModel):
    sku: str


class Price(BaseModel):
    cents: int


class OrderPlaced(mqkit.Event, event_type="memtest.orders.placed"):
    order_id: int


class OrderShipped(mqkit.Event, event_type="memtest.orders.shipped"):
    order_id: int


@contextmanager
def raw_channel(broker: MemoryBroker, *, confirm: bool = True) -> Iterator[Any]:
    """A plain pika channel on the memory broker (for shapes mqkit does not make); with
    ``confirm``, each publish returns once the broker has routed it."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = connection.channel()
        if confirm:
            channel.confirm_delivery()
        yield channel
    finally:
        if connection.is_open:
            connection.close()


def publish_raw(channel: Any, exchange: str, key: str, body: bytes = b"{}", **props: Any) -> None:
    channel.basic_publish(exchange, key, body, pika.BasicProperties(**props))


def x_death(broker: MemoryBroker, queue: str, index: int = 0) -> dict[str, Any]:
    """The newest ``x-death`` entry of message ``index`` in ``queue``."""
    deaths = broker.peek(queue)[index].headers["x-death"]
    return dict(deaths[0])


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# -- routing ---------------------------------------------------------------------------------


def test_default_exchange_routes_by_queue_name(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url, service="shop") as client:
        client.producer(Order, queue="orders").publish(Order(id=1))
        assert mqkit_memory.count("orders") == 1
        assert mqkit_memory.count("orders.dlq") == 0  # the producer declares the DLQ too
        [message] = mqkit_memory.peek("orders")
        assert message.decode(Order) == Order(id=1)
        assert message.routing_key == "orders"
        assert message.properties is not None and message.properties.app_id == "shop"

        handled = Recorder()
        with client.consumer("orders", Order, handled):
            assert handled.wait(1) == [Order(id=1)]
            mqkit_memory.settle()
        assert mqkit_memory.count("orders") == 0
        assert mqkit_memory.unacked("orders") == 0


def test_direct_exchange_routes_by_exact_key(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.declare(
            mqkit.Exchange("shop", type="direct"),
            mqkit.Queue("eu", type="classic"),
            mqkit.Queue("us", type="classic"),
            mqkit.Binding("shop", "eu", "orders.eu"),
            mqkit.Binding("shop", "us", "orders.us"),
        )
        producer = client.producer(Order, exchange="shop")
        producer.publish(Order(id=1), routing_key="orders.eu")
        producer.publish(Order(id=2), routing_key="orders.us")
        producer.publish(Order(id=3), routing_key="orders.eu")
        with pytest.raises(mqkit.PublishUnroutable):
            producer.publish(Order(id=4), routing_key="orders")  # direct: no partial match
    assert published(mqkit_memory, "eu", Order) == [Order(id=1), Order(id=3)]
    assert published(mqkit_memory, "us", Order) == [Order(id=2)]
    assert mqkit_memory.exchanges()["shop"] == "direct"


def test_topic_exchange_matches_star_and_hash(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.declare(
            mqkit.Exchange("events"),  # topic by default
            mqkit.Queue("one-word", type="classic"),
            mqkit.Queue("any-depth", type="classic"),
            mqkit.Queue("everything", type="classic"),
            mqkit.Binding("events", "one-word", "orders.*"),
            mqkit.Binding("events", "any-depth", "orders.#"),
            mqkit.Binding("events", "everything", "#"),
        )
        producer = client.producer(Order, exchange="events")
        for n, key in enumerate(["orders.placed", "orders.placed.eu", "orders", "billing.paid"]):
            producer.publish(Order(id=n), routing_key=key)
    assert [o.id for o in published(mqkit_memory, "one-word", Order)] == [0]
    assert [o.id for o in published(mqkit_memory, "any-depth", Order)] == [0, 1, 2]
    assert [o.id for o in published(mqkit_memory, "everything", Order)] == [0, 1, 2, 3]


def test_fanout_exchange_ignores_the_key(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.declare(
            mqkit.Exchange("broadcast", type="fanout"),
            mqkit.Queue("a", type="classic"),
            mqkit.Queue("b", type="classic"),
            mqkit.Binding("broadcast", "a", "ignored"),
            mqkit.Binding("broadcast", "b", "whatever"),
        )
        client.producer(Order, exchange="broadcast").publish(Order(id=7), routing_key="x.y")
    assert mqkit_memory.count("a") == mqkit_memory.count("b") == 1
    assert mqkit_memory.peek("b")[0].routing_key == "x.y"


def test_event_bus_delivers_to_each_subscribed_service(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url, service="shop") as client:
        shipping, mail = Recorder(), Recorder()
        everything = Recorder()
        with (
            client.event_bus(service="shipping") as shipping_bus,
            client.event_bus(service="mail") as mail_bus,
        ):
            shipping_bus.subscribe(OrderPlaced, shipping)
            mail_bus.subscribe(OrderPlaced, mail)
            mail_bus.subscribe("memtest.orders.#", everything)
            bus = client.event_bus()
            bus.publish(OrderPlaced(order_id=1))
            bus.publish(OrderShipped(order_id=1))
            mqkit_memory.settle()
            assert shipping.messages == [OrderPlaced(order_id=1)]
            assert mail.messages == [OrderPlaced(order_id=1)]
            assert sorted(type(e).__name__ for e in everything.messages) == [
                "OrderPlaced",
                "OrderShipped",
            ]
            assert shipping.contexts[0].event_type == "memtest.orders.placed"
        # Bus queues are <service>.<event>, on the topic exchange mqkit.events.
        assert "shipping.memtest.orders.placed" in mqkit_memory.queues()
        assert mqkit_memory.exchanges()["mqkit.events"] == "topic"


async def test_async_event_bus_and_queue_routing(mqkit_memory: MemoryBroker) -> None:
    async with mqkit.AsyncClient(url=mqkit_memory.url, service="shop") as client:
        placed = Recorder()
        bus = client.event_bus(service="shipping")
        bus.subscribe(OrderPlaced, placed)
        async with bus:
            await client.event_bus().publish(OrderPlaced(order_id=5))
            await mqkit_memory.settle_async()
            assert await placed.wait_async(1) == [OrderPlaced(order_id=5)]

        producer = await client.producer(Order, queue="orders")
        await producer.publish_many([Order(id=1), Order(id=2)])
        assert published(mqkit_memory.url, "orders", Order) == [Order(id=1), Order(id=2)]
        handled = Recorder()
        async with client.consumer("orders", Order, handled):
            assert await handled.wait_async(2) == [Order(id=1), Order(id=2)]
            await mqkit_memory.settle_async()
        assert mqkit_memory.count("orders") == 0


def test_exchange_to_exchange_and_alternate_exchange(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        ch.exchange_declare("unrouted", "fanout")
        ch.exchange_declare("front", "direct", arguments={"alternate-exchange": "unrouted"})
        ch.exchange_declare("back", "fanout")
        for queue in ("known", "leftover", "via-back"):
            ch.queue_declare(queue)
        ch.queue_bind("known", "front", "k")
        ch.queue_bind("leftover", "unrouted")
        ch.exchange_bind("back", "front", "k")
        ch.queue_bind("via-back", "back")
        publish_raw(ch, "front", "k", b"1")
        publish_raw(ch, "front", "nothing-bound", b"2")
    assert [m.body for m in mqkit_memory.peek("known")] == [b"1"]
    assert [m.body for m in mqkit_memory.peek("via-back")] == [b"1"]
    assert [m.body for m in mqkit_memory.peek("leftover")] == [b"2"]


# -- mandatory returns and confirms ----------------------------------------------------------


def test_mandatory_publish_with_no_queue_is_unroutable(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.declare(mqkit.Exchange("lonely", type="direct"))
        with pytest.raises(mqkit.PublishUnroutable) as caught:
            client.producer(Order, exchange="lonely").publish(Order(id=1), routing_key="k")
        assert len(caught.value.unconfirmed) == 1
        # The bus: no subscriber is fine, unless mandatory.
        bus = client.event_bus(exchange="quiet-events")
        bus.publish(OrderPlaced(order_id=1))
        with pytest.raises(mqkit.PublishUnroutable):
            bus.publish(OrderPlaced(order_id=2), mandatory=True)
        # A request to a queue nobody declared comes back too.
        with pytest.raises(mqkit.PublishUnroutable):
            client.request("nobody-answers-here", Quote(sku="MUG"), Price, timeout=2)
    assert set(mqkit_memory.queues()) == set()


async def test_async_mandatory_publish_with_no_queue_is_unroutable(
    mqkit_memory: MemoryBroker,
) -> None:
    async with mqkit.AsyncClient(url=mqkit_memory.url) as client:
        await client.declare(mqkit.Exchange("lonely", type="direct"))
        producer = await client.producer(Order, exchange="lonely")
        with pytest.raises(mqkit.PublishUnroutable):
            await producer.publish(Order(id=1), routing_key="k")
        with pytest.raises(mqkit.PublishUnroutable):
            await client.event_bus().publish(OrderPlaced(order_id=2), mandatory=True)


def test_raw_mandatory_return_carries_no_route(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        with pytest.raises(pika.exceptions.UnroutableError) as caught:
            ch.basic_publish("", "no-such-queue", b"x", mandatory=True)
        [returned] = caught.value.messages
        assert returned.method.reply_code == 312
        assert returned.method.reply_text == "NO_ROUTE"
        assert returned.body == b"x"
        ch.basic_publish("", "no-such-queue", b"y")  # not mandatory: dropped, still acked


def test_confirms_ack_stored_messages_and_nack_a_full_reject_publish_queue(
    mqkit_memory: MemoryBroker,
) -> None:
    full = mqkit.Queue(
        "small", type="classic", arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    with mqkit.Client(url=mqkit_memory.url) as client:
        producer = client.producer(Order, queue=full)
        ids = producer.publish_many([Order(id=1), Order(id=2)])
        assert len(set(ids)) == 2
        with pytest.raises(mqkit.PublishNacked) as caught:
            producer.publish(Order(id=3))
        assert len(caught.value.unconfirmed) == 1
    assert published(mqkit_memory, "small", Order) == [Order(id=1), Order(id=2)]
    assert [m.message_id for m in mqkit_memory.peek("small")] == ids


async def test_async_confirm_nack_is_publish_nacked(mqkit_memory: MemoryBroker) -> None:
    full = mqkit.Queue(
        "small", type="classic", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    async with mqkit.AsyncClient(url=mqkit_memory.url) as client:
        producer = await client.producer(Order, queue=full)
        await producer.publish(Order(id=1))
        with pytest.raises(mqkit.PublishNacked):
            await producer.publish(Order(id=2))
    assert mqkit_memory.count("small") == 1


def test_message_above_the_size_limit_is_refused(mqkit_memory: MemoryBroker) -> None:
    mqkit_memory.max_message_size = 1000
    with raw_channel(mqkit_memory) as ch:
        ch.queue_declare("big")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
            ch.basic_publish("", "big", b"x" * 1001)
        assert caught.value.reply_code == 406
        assert "larger than configured max size 1000" in caught.value.reply_text
    assert mqkit_memory.count("big") == 0


# -- prefetch, acks and requeues -------------------------------------------------------------


def test_consumer_prefetch_bounds_unacked_deliveries(mqkit_memory: MemoryBroker) -> None:
    release, started = threading.Event(), Recorder()

    def slow(order: Order, ctx: mqkit.Context) -> None:
        started(order, ctx)
        release.wait(10)

    handled = Recorder(slow)
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.producer(Order, queue="orders").publish_many([Order(id=n) for n in range(5)])
        with client.consumer("orders", Order, handled, prefetch=2, concurrency=2):
            started.wait(2)
            # Two are in the handlers; the broker holds the rest back for want of room.
            assert mqkit_memory.unacked("orders") == 2
            assert mqkit_memory.count("orders") == 3
            release.set()
            handled.wait(5)
            mqkit_memory.settle()
    assert sorted(o.id for o in handled.messages) == [0, 1, 2, 3, 4]
    assert mqkit_memory.count("orders") == 0


def test_raw_prefetch_and_requeue_with_redelivered(mqkit_memory: MemoryBroker) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(mqkit_memory.amqp_url))
    got: list[tuple[int, bytes, bool]] = []

    def until(count: int) -> list[tuple[bytes, bool]]:
        """Take deliveries until ``count`` have come (each call returns after one event)."""
        deadline = time.monotonic() + 5
        while len(got) < count and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.05)
        return [(body, again) for _, body, again in got]

    try:
        ch = connection.channel()
        ch.queue_declare("work")
        for n in range(4):
            publish_raw(ch, "", "work", str(n).encode())
        ch.basic_qos(prefetch_count=2)
        ch.basic_consume("work", lambda c, m, p, b: got.append((m.delivery_tag, b, m.redelivered)))
        assert until(2) == [(b"0", False), (b"1", False)]
        # The broker holds the other two back: the consumer has no room.
        assert (mqkit_memory.unacked("work"), mqkit_memory.count("work")) == (2, 2)

        # A requeued message goes back to its place (the head), marked redelivered.
        ch.basic_nack(got[0][0], requeue=True)
        ch.basic_ack(got[1][0])
        assert until(4)[2:] == [(b"0", True), (b"2", False)]
        ch.basic_reject(got[2][0], requeue=False)  # no dead-letter exchange: dropped
        ch.basic_ack(got[3][0])
        assert until(5)[4:] == [(b"3", False)]
        ch.queue_declare("work", passive=True)  # a round trip: the broker has read the acks
        assert (mqkit_memory.unacked("work"), mqkit_memory.count("work")) == (1, 0)
    finally:
        connection.close()
    # The connection closed with one unacked: it is back in the queue, redelivered.
    [left] = mqkit_memory.peek("work")
    assert (left.body, left.redelivered) == (b"3", True)


def test_basic_get_and_channel_close_requeue(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        ch.queue_declare("work")
        publish_raw(ch, "", "work", b"a")
        publish_raw(ch, "", "work", b"b")
        method, _, body = ch.basic_get("work")
        assert (body, method.redelivered, method.message_count) == (b"a", False, 1)
        # Taken without an ack: unacked, as RabbitMQ counts it (messages_unacknowledged).
        assert mqkit_memory.count("work") == 1 and mqkit_memory.unacked("work") == 1
    # basic.get's unacked message went back at the head when the connection closed.
    assert [(m.body, m.redelivered) for m in mqkit_memory.peek("work")] == [
        (b"a", True),
        (b"b", False),
    ]


# -- TTL, dead-lettering, delivery limits, max-length ----------------------------------------


def dead_letter_setup(ch: Any, queue: str, **arguments: Any) -> None:
    """``queue`` dead-lettering to the fanout exchange ``dlx``, which feeds ``dead``."""
    ch.exchange_declare("dlx", "fanout")
    ch.queue_declare("dead")
    ch.queue_bind("dead", "dlx")
    ch.queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": "dlx", **arguments})


def test_queue_ttl_dead_letters_with_x_death_on_the_virtual_clock(
    mqkit_memory: MemoryBroker,
) -> None:
    with raw_channel(mqkit_memory) as ch:
        dead_letter_setup(ch, "held", **{"x-message-ttl": 5000})
        publish_raw(ch, "", "held", b"late", headers={"tenant": "acme"})
    mqkit_memory.advance(4.9)
    assert (mqkit_memory.count("held"), mqkit_memory.count("dead")) == (1, 0)
    mqkit_memory.advance(0.2)
    assert (mqkit_memory.count("held"), mqkit_memory.count("dead")) == (0, 1)
    [message] = mqkit_memory.peek("dead")
    assert message.body == b"late" and message.headers["tenant"] == "acme"
    death = x_death(mqkit_memory, "dead")
    assert text(death["reason"]) == "expired"
    assert text(death["queue"]) == "held"
    assert death["count"] == 1
    assert text(death["exchange"]) == ""
    assert [text(k) for k in death["routing-keys"]] == ["held"]
    assert text(message.headers["x-first-death-reason"]) == "expired"
    assert text(message.headers["x-first-death-queue"]) == "held"


def test_per_message_expiration_then_a_rejection(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        # "bounce" dead-letters to "held" and "held" back to "bounce", by the default exchange.
        for queue, target in (("bounce", "held"), ("held", "bounce")):
            ch.queue_declare(
                queue,
                arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target},
            )
        publish_raw(ch, "", "bounce", b"m", expiration="1000")
        mqkit_memory.advance(0.9)
        assert mqkit_memory.count("bounce") == 1
        mqkit_memory.advance(0.1)
        assert (mqkit_memory.count("bounce"), mqkit_memory.count("held")) == (0, 1)
        death = x_death(mqkit_memory, "held")
        assert (text(death["queue"]), text(death["reason"])) == ("bounce", "expired")
        assert text(death["original-expiration"]) == "1000"
        assert mqkit_memory.peek("held")[0].properties.expiration is None

        method, _, _ = ch.basic_get("held")
        ch.basic_nack(method.delivery_tag, requeue=False)
    [message] = mqkit_memory.peek("bounce")
    deaths = [(text(d["queue"]), text(d["reason"])) for d in message.headers["x-death"]]
    assert deaths == [("held", "rejected"), ("bounce", "expired")]  # newest first
    assert text(message.headers["x-first-death-reason"]) == "expired"
    assert text(message.headers["x-last-death-reason"]) == "rejected"
    # Its expiration went when it was dead-lettered: it stays now.
    mqkit_memory.advance(3600)
    assert mqkit_memory.count("bounce") == 1


def test_x_death_counts_each_cycle(mqkit_memory: MemoryBroker) -> None:
    """A message expires from ``a`` into ``b``; a consumer rejects it there, back into ``a``;
    it expires again: ``a``'s entry counts 2, and the rejection makes it no cycle."""
    with raw_channel(mqkit_memory) as ch:
        ch.queue_declare(
            "a",
            arguments={
                "x-message-ttl": 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "b",
            },
        )
        ch.queue_declare(
            "b", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "a"}
        )
        publish_raw(ch, "", "a", b"ball")

    def deaths(queue: str) -> dict[tuple[str, str], int]:
        [message] = mqkit_memory.peek(queue)
        return {
            (text(d["queue"]), text(d["reason"])): d["count"] for d in message.headers["x-death"]
        }

    mqkit_memory.advance(1)
    assert deaths("b") == {("a", "expired"): 1}
    with raw_channel(mqkit_memory, confirm=False) as ch:
        method, _, _ = ch.basic_get("b")
        ch.basic_reject(method.delivery_tag, requeue=False)
        ch.queue_declare("b", passive=True)  # a round trip: the reject has been read
    assert deaths("a") == {("a", "expired"): 1, ("b", "rejected"): 1}
    mqkit_memory.advance(1)
    assert deaths("b") == {("a", "expired"): 2, ("b", "rejected"): 1}
    assert text(x_death(mqkit_memory, "b")["queue"]) == "a"  # the newest first


def test_a_cycle_without_a_rejection_is_dropped(mqkit_memory: MemoryBroker) -> None:
    """ping and pong hold a message a second each, then hand it to the other: back at ping
    it would go round without end, and RabbitMQ drops it there."""
    with raw_channel(mqkit_memory) as ch:
        for queue, target in (("ping", "pong"), ("pong", "ping")):
            ch.queue_declare(
                queue,
                arguments={
                    "x-message-ttl": 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": target,
                },
            )
        publish_raw(ch, "", "ping", b"ball")
    mqkit_memory.advance(1)
    assert (mqkit_memory.count("ping"), mqkit_memory.count("pong")) == (0, 1)
    mqkit_memory.advance(1)
    assert (mqkit_memory.count("ping"), mqkit_memory.count("pong")) == (0, 0)


def test_quorum_delivery_limit_dead_letters_after_limit_plus_one_deliveries(
    mqkit_memory: MemoryBroker,
) -> None:
    with raw_channel(mqkit_memory) as ch:
        dead_letter_setup(ch, "flaky", **{"x-queue-type": "quorum", "x-delivery-limit": 2})
        publish_raw(ch, "", "flaky", b"poison")
        counts = []
        for _ in range(10):
            method, props, _ = ch.basic_get("flaky")
            if method is None:
                break
            counts.append((props.headers or {}).get("x-delivery-count"))
            assert method.redelivered == (len(counts) > 1)
            ch.basic_nack(method.delivery_tag, requeue=True)
    assert counts == [None, 1, 2]
    assert mqkit_memory.count("dead") == 1
    assert text(x_death(mqkit_memory, "dead")["reason"]) == "delivery_limit"
    assert "x-delivery-count" not in mqkit_memory.peek("dead")[0].headers


def test_delivery_limit_needs_a_quorum_queue(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        dead_letter_setup(ch, "classic", **{"x-delivery-limit": 1})
        publish_raw(ch, "", "classic", b"m")
        for _ in range(4):
            method, _, _ = ch.basic_get("classic")
            ch.basic_nack(method.delivery_tag, requeue=True)
    assert (mqkit_memory.count("classic"), mqkit_memory.count("dead")) == (1, 0)


def test_max_length_drops_the_head_to_the_dead_letter_exchange(
    mqkit_memory: MemoryBroker,
) -> None:
    with raw_channel(mqkit_memory) as ch:
        dead_letter_setup(ch, "recent", **{"x-max-length": 2})
        for body in (b"1", b"2", b"3", b"4"):
            publish_raw(ch, "", "recent", body)
    assert [m.body for m in mqkit_memory.peek("recent")] == [b"3", b"4"]
    assert [m.body for m in mqkit_memory.peek("dead")] == [b"1", b"2"]
    assert text(x_death(mqkit_memory, "dead")["reason"]) == "maxlen"


def test_reject_publish_dlx_dead_letters_the_newcomer(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        dead_letter_setup(ch, "capped", **{"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
        ch.confirm_delivery()
        publish_raw(ch, "", "capped", b"first")
        with pytest.raises(pika.exceptions.NackError):
            publish_raw(ch, "", "capped", b"second")
    assert [m.body for m in mqkit_memory.peek("capped")] == [b"first"]
    assert [m.body for m in mqkit_memory.peek("dead")] == [b"second"]


# -- declare conflicts -----------------------------------------------------------------------


def test_queue_declared_again_with_other_arguments_is_a_topology_error(
    mqkit_memory: MemoryBroker,
) -> None:
    with mqkit.Client(url=mqkit_memory.url) as first:
        first.declare(mqkit.Queue("orders", type="classic"))
    strict = mqkit.Settings(url=mqkit_memory.url, declare="strict")
    with mqkit.Client(strict) as client:
        with pytest.raises(mqkit.TopologyError) as caught:
            client.declare(mqkit.Queue("orders", type="quorum"))
        assert caught.value.reply_code == 406
        assert "x-queue-type" in str(caught.value) and "orders" in str(caught.value)
        # The client is still usable after the refused declare.
        client.producer(Order, queue=mqkit.Queue("orders", type="classic")).publish(Order(id=1))
    assert mqkit_memory.count("orders") == 1


def test_exchange_of_another_type_is_a_topology_error_even_in_auto_mode(
    mqkit_memory: MemoryBroker,
) -> None:
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.declare(mqkit.Exchange("shop", type="direct"))
    with mqkit.Client(url=mqkit_memory.url) as client:
        with pytest.raises(mqkit.TopologyError) as caught:
            client.declare(mqkit.Exchange("shop", type="fanout"))
        assert caught.value.reply_code == 406
        assert "shop" in str(caught.value)
    assert mqkit_memory.exchanges()["shop"] == "direct"


async def test_async_declare_conflict_is_a_topology_error(mqkit_memory: MemoryBroker) -> None:
    async with mqkit.AsyncClient(url=mqkit_memory.url) as client:
        await client.declare(mqkit.Queue("orders", type="classic"))
    settings = mqkit.Settings(url=mqkit_memory.url, declare="strict")
    async with mqkit.AsyncClient(settings) as client:
        with pytest.raises(mqkit.TopologyError) as caught:
            await client.declare(mqkit.Queue("orders", type="quorum"))
        assert caught.value.reply_code == 406
        assert "x-queue-type" in str(caught.value)


def test_raw_declare_conflict_texts_are_rabbitmqs(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory) as ch:
        ch.queue_declare("q", arguments={"x-message-ttl": 1000})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
            ch.queue_declare("q", arguments={"x-message-ttl": 2000})
    assert caught.value.reply_code == 406
    assert caught.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': "
        "received the value '2000' of type 'signedint' but current is the value '1000' of "
        "type 'signedint'"
    )
    with (
        raw_channel(mqkit_memory) as ch,
        pytest.raises(pika.exceptions.ChannelClosedByBroker) as missing,
    ):
        ch.queue_declare("absent", passive=True)
    assert missing.value.reply_code == 404
    assert missing.value.reply_text == "NOT_FOUND - no queue 'absent' in vhost '/'"


# -- direct reply-to -------------------------------------------------------------------------


def test_request_and_responder_over_direct_reply_to(mqkit_memory: MemoryBroker) -> None:
    def price(quote: Quote, ctx: mqkit.Context) -> Price:
        if quote.sku == "BROKEN":
            raise LookupError("no price for BROKEN")
        return Price(cents=len(quote.sku) * 100)

    with (
        mqkit.Client(url=mqkit_memory.url, service="pricing") as server,
        mqkit.Client(url=mqkit_memory.url, service="orders") as caller,
    ):
        with server.responder("pricing.quotes", Quote, price):
            assert caller.request("pricing.quotes", Quote(sku="MUG"), Price) == Price(cents=300)
            assert caller.request("pricing.quotes", Quote(sku="SPOON"), Price).cents == 500
            with pytest.raises(mqkit.RemoteError) as caught:
                caller.request("pricing.quotes", Quote(sku="BROKEN"), Price)
            assert caught.value.error_type == "LookupError"
            mqkit_memory.settle()
        # Replies went straight to the caller's channel: no reply queue was made.
        assert set(mqkit_memory.queues()) == {"pricing.quotes", "pricing.quotes.dlq"}


async def test_async_request_and_responder(mqkit_memory: MemoryBroker) -> None:
    async def price(quote: Quote, ctx: mqkit.Context) -> Price:
        return Price(cents=len(quote.sku))

    async with (
        mqkit.AsyncClient(url=mqkit_memory.url, service="pricing") as server,
        mqkit.AsyncClient(url=mqkit_memory.url, service="orders") as caller,
        server.responder("pricing.quotes", Quote, price),
    ):
        replies = await asyncio.gather(
            *(caller.request("pricing.quotes", Quote(sku="x" * n), Price) for n in (1, 2, 3))
        )
        assert [r.cents for r in replies] == [1, 2, 3]


def test_raw_direct_reply_to_needs_its_consumer(mqkit_memory: MemoryBroker) -> None:
    with (
        raw_channel(mqkit_memory) as ch,
        pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught,
    ):
        publish_raw(ch, "", "anything", reply_to="amq.rabbitmq.reply-to")
    assert caught.value.reply_code == 406
    assert "fast reply consumer does not exist" in caught.value.reply_text


# -- the broker's own helpers ----------------------------------------------------------------


def test_count_and_peek_show_what_a_service_published(mqkit_memory: MemoryBroker) -> None:
    """The service under test turns each Order into an Invoice on ``invoices``; the test
    looks at what it published without consuming it."""

    def invoicing(client: mqkit.Client) -> mqkit.Consumer[Order]:
        invoices = client.producer(Invoice, queue="invoices")

        def invoice(order: Order, ctx: mqkit.Context) -> None:
            invoices.publish(
                Invoice(order_id=order.id, total=order.id * 10),
                headers={"tenant": "acme"},
                correlation_id=ctx.message_id,
            )

        return client.consumer("orders", Order, invoice)

    with mqkit.Client(url=mqkit_memory.url, service="billing") as client:
        order_ids = client.producer(Order, queue="orders").publish_many([Order(id=1), Order(id=2)])
        with invoicing(client):
            mqkit_memory.settle()
    assert mqkit_memory.count("invoices") == 2
    assert published(mqkit_memory, "invoices", Invoice) == [
        Invoice(order_id=1, total=10),
        Invoice(order_id=2, total=20),
    ]
    first, second = mqkit_memory.peek("invoices")
    assert first.headers["tenant"] == "acme"
    assert first.properties is not None and first.properties.app_id == "billing"
    assert [first.properties.correlation_id, second.properties.correlation_id] == order_ids
    assert len(mqkit_memory.peek("invoices", limit=1)) == 1
    assert mqkit_memory.count("invoices") == 2  # peeking takes nothing
    with pytest.raises(KeyError, match="no queue 'nope'"):
        mqkit_memory.count("nope")


def test_published_fails_the_test_on_a_body_of_another_type(mqkit_memory: MemoryBroker) -> None:
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.producer(Order, queue="orders").publish(Order(id=1))
    with pytest.raises(pytest.fail.Exception, match="message 0 in 'orders' is not a Invoice"):
        published(mqkit_memory, "orders", Invoice)


def test_memory_a_and_memory_b_are_separate_brokers() -> None:
    a, b = memory_broker("a"), memory_broker("b")
    try:
        assert a is not b and a.port != b.port
        assert memory_broker("a") is a  # one broker per name in the process
        assert (a.url, b.url) == ("memory://a", "memory://b")
        with mqkit.Client(url="memory://a") as client:
            client.producer(Order, queue="orders").publish(Order(id=1))
        with mqkit.Client(url="memory://b") as client:
            client.producer(Order, queue="orders").publish_many([Order(id=2), Order(id=3)])
            client.producer(Order, queue="only-on-b").publish(Order(id=4))
        assert published(a, "orders", Order) == [Order(id=1)]
        assert published(b, "orders", Order) == [Order(id=2), Order(id=3)]
        assert "only-on-b" not in a.queues()
    finally:
        a.close()
        b.close()


def test_close_gives_a_fresh_broker_next_time(mqkit_memory: MemoryBroker) -> None:
    name = mqkit_memory.name
    with mqkit.Client(url=mqkit_memory.url) as client:
        client.producer(Order, queue="orders").publish(Order(id=1))
    assert mqkit_memory.count("orders") == 1
    mqkit_memory.close()
    mqkit_memory.close()  # idempotent
    assert mqkit_memory.closed
    with pytest.raises(RuntimeError, match="closed"):
        mqkit_memory.count("orders")

    fresh = memory_broker(name)
    assert fresh is not mqkit_memory and not fresh.closed
    assert fresh.queues() == {}
    with mqkit.Client(url=fresh.url) as client:
        client.producer(Order, queue="orders").publish(Order(id=2))
    assert published(fresh, "orders", Order) == [Order(id=2)]
    fresh.close()


def test_close_releases_its_event_loop() -> None:
    """A closed broker leaves nothing to clean up: under ``-W error`` an event loop or socket
    left open is a ResourceWarning that fails whichever test the garbage collector runs in."""
    broker = memory_broker("closing")
    with mqkit.Client(url=broker.url) as client:
        client.producer(Order, queue="orders").publish(Order(id=1))
    broker.close()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        del broker, client
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []


def test_connections_are_listed_by_name_and_can_be_closed(mqkit_memory: MemoryBroker) -> None:
    handled = Recorder()
    with (
        mqkit.Client(url=mqkit_memory.url, service="inventory") as client,
        client.consumer("orders", Order, handled),
    ):
        names = list(mqkit_memory.connections().values())
        assert any("inventory" in name for name in names), names
        assert mqkit_memory.close_connections("inventory") >= 1
        # The client reconnects on its own and keeps consuming.
        client.producer(Order, queue="orders").publish(Order(id=1))
        assert handled.wait(1) == [Order(id=1)]
    mqkit_memory.settle()
    assert mqkit_memory.connections() == {}


def test_wrong_password_is_connection_failed_naming_the_credentials(
    mqkit_memory: MemoryBroker,
) -> None:
    wrong = mqkit_memory.amqp_url.replace("guest:guest@", "guest:hunter2@")
    with pytest.raises(mqkit.ConnectionFailed) as caught:
        mqkit.Client(url=wrong, connect_timeout=3).connect()
    message = str(caught.value)
    assert "credentials" in message and "wrong username or password" in message
    assert "hunter2" not in message

    # A memory URL logs in as guest/guest: change the broker's users and it is refused too.
    mqkit_memory.users = {"billing": "s3cret"}
    with pytest.raises(mqkit.ConnectionFailed, match="credentials"):
        mqkit.Client(url=mqkit_memory.url, connect_timeout=3).connect()


async def test_async_wrong_password_is_connection_failed(mqkit_memory: MemoryBroker) -> None:
    wrong = mqkit_memory.amqp_url.replace("guest:guest@", "guest:hunter2@")
    client = mqkit.AsyncClient(url=wrong, connect_timeout=3)
    with pytest.raises(mqkit.ConnectionFailed) as caught:
        await client.connect()
    assert "credentials" in str(caught.value) and "hunter2" not in str(caught.value)
    await client.close()


def test_close_with_a_raw_connection_still_open_leaves_nothing_behind() -> None:
    """The broker closes what it serves itself: a client that never said goodbye leaves no
    socket, task or loop open (each would be a ResourceWarning in a later test)."""
    broker = memory_broker("closing-raw")
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    connection.channel().queue_declare("held")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        broker.close()
        del broker
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []
    assert not any(t.name.startswith("mqkit-memory[closing-raw]") for t in threading.enumerate())
    with pytest.raises(pika.exceptions.AMQPError):
        connection.process_data_events(time_limit=1)  # the broker closed it
    if connection.is_open:
        connection.close()


def test_a_dead_letter_cycle_is_dropped_as_rabbitmq_drops_it(mqkit_memory: MemoryBroker) -> None:
    """A queue that dead-letters its expired messages back to itself: RabbitMQ drops the
    message rather than cycle without end (no rejection in the cycle)."""
    with raw_channel(mqkit_memory) as channel:
        channel.queue_declare("loop", arguments={"x-message-ttl": 0, "x-dead-letter-exchange": ""})
        publish_raw(channel, "", "loop")
        assert channel.queue_declare("loop", passive=True).method.message_count == 0
    assert mqkit_memory.next_expiry() is None
    mqkit_memory.run_until_idle(timeout=2)


def test_a_multiple_ack_of_an_unknown_tag_closes_the_channel(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory, confirm=False) as channel:
        channel.queue_declare("acks")
        publish_raw(channel, "", "acks")
        method, _, _ = channel.basic_get("acks")
        assert method is not None
        channel.basic_ack(method.delivery_tag + 5, multiple=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            channel.basic_get("acks")
        assert info.value.reply_code == 406 and "unknown delivery tag" in info.value.reply_text


def test_a_quorum_queue_without_a_limit_has_rabbitmq_4s_twenty(mqkit_memory: MemoryBroker) -> None:
    with raw_channel(mqkit_memory, confirm=False) as channel:
        channel.queue_declare(
            "q4",
            durable=True,
            arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": ""},
        )
        publish_raw(channel, "", "q4")
        deliveries = 0
        while (got := channel.basic_get("q4"))[0] is not None:
            deliveries += 1
            channel.basic_nack(got[0].delivery_tag, requeue=True)
        assert deliveries == 21  # the first delivery, then 20 redeliveries
