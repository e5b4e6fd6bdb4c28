"""The asyncio runtime on its own: ``AsyncClient`` driven by ``async def`` tests.

The shared behaviour suite (``rt`` fixture) runs the async runtime through a blocking
wrapper; these tests use it the way an asyncio service does, and cover what only an asyncio
test can show (tasks, cancellation, ``run()``/``stop()``, reconnects while the loop runs).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import time
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from pydantic import BaseModel

import mqkit
from mqkit.testing import FaultProxy


class Order(BaseModel):
    order_id: str
    amount: Decimal


class Refund(BaseModel):
    order_id: str


class Receipt(BaseModel):
    order_id: str
    ok: bool


class AsyncOrderPlaced(mqkit.Event, event_type="asyncrt.orders.placed"):
    order_id: str


class AsyncOrderShipped(mqkit.Event, event_type="asyncrt.orders.shipped"):
    order_id: str


class AsyncCacheCleared(mqkit.Event, event_type="asyncrt.cache.cleared"):
    key: str


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def json_props(**kwargs: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, **kwargs)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` (sync or async) until true; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


class Recorder:
    """An ``async def`` handler recording what it got (and optionally doing more)."""

    def __init__(self, behaviour: Any = None) -> None:
        self.items: list[tuple[Any, mqkit.Context]] = []
        self.times: list[float] = []
        self.behaviour = behaviour

    async def __call__(self, message: Any, ctx: mqkit.Context) -> Any:
        self.items.append((message, ctx))
        self.times.append(time.monotonic())
        if self.behaviour is not None:
            result = self.behaviour(message, ctx)
            if asyncio.iscoroutine(result):
                return await result
            return result
        return None

    @property
    def messages(self) -> list[Any]:
        return [m for m, _ in self.items]

    async def wait(self, count: int, timeout: float = 10.0) -> list[Any]:
        await eventually(lambda: len(self.items) >= count, timeout, f"{count} messages")
        return self.messages


@pytest.fixture
def client_for(broker_url: str):  # type: ignore[no-untyped-def]
    """``client_for(**overrides)``: an (unconnected) AsyncClient on the test broker."""

    def make(**overrides: Any) -> mqkit.AsyncClient:
        overrides.setdefault("url", broker_url)
        overrides.setdefault("connect_timeout", 10)
        return mqkit.AsyncClient(**overrides)

    return make


# ------------------------------------------------------------------------------ round trip


async def test_round_trip_keeps_fields_ids_correlation_and_headers(client_for, names) -> None:
    queue = names.queue()
    got = Recorder()
    async with client_for(service=names.service()) as client:
        consumer = client.consumer(queue, Order, got)
        async with consumer:
            producer = await client.producer(Order, queue=queue)
            message_id = await producer.publish(
                Order(order_id="1", amount=Decimal("9.90")),
                correlation_id="corr-1",
                headers={"tenant": "acme"},
            )
            [message] = await got.wait(1)
        assert not consumer.started
    [(_, ctx)] = got.items
    assert message == Order(order_id="1", amount=Decimal("9.90"))
    assert ctx.message_id == message_id
    assert ctx.correlation_id == "corr-1"
    assert ctx.headers["tenant"] == "acme"
    assert ctx.attempt == 1 and not ctx.redelivered
    assert ctx.queue == queue and ctx.routing_key == queue and ctx.exchange == ""
    assert ctx.event_type == "Order"
    assert ctx.timestamp is not None


async def test_publish_many_arrives_in_full(client_for, names, raw) -> None:
    queue = names.queue()
    got = Recorder()
    async with client_for() as client:
        producer = await client.producer(Order, queue=queue)
        ids = await producer.publish_many(
            [Order(order_id=str(i), amount=Decimal(i)) for i in range(2000)]
        )
        assert len(set(ids)) == 2000
        assert raw.count(queue) == 2000  # confirmed means stored
        async with client.consumer(queue, Order, got, prefetch=100):
            await got.wait(2000, timeout=30)
    assert sorted(int(m.order_id) for m in got.messages) == list(range(2000))
    assert raw.count(queue) == 0  # every one acked (in batches)


async def test_publish_wrong_type_is_a_type_error(client_for, names, raw) -> None:
    queue = names.queue()
    async with client_for() as client:
        producer = await client.producer(Order, queue=queue)
        with pytest.raises(TypeError, match=r"Producer\[Order\]\.publish expected Order, got dict"):
            await producer.publish({"order_id": "1"})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Refund"):
            await producer.publish_many([Refund(order_id="2")])  # type: ignore[list-item]
    assert raw.count(queue) == 0


async def test_unroutable_publish(client_for, names) -> None:
    exchange = names.exchange()
    async with client_for() as client:
        producer = await client.producer(
            Order, exchange=mqkit.Exchange(exchange), routing_key="nobody.home"
        )
        with pytest.raises(mqkit.PublishUnroutable, match=r"nobody\.home") as info:
            await producer.publish(Order(order_id="1", amount=Decimal(1)))
        assert len(info.value.unconfirmed) == 1
        with pytest.raises(mqkit.PublishUnroutable) as many:
            await producer.publish_many(
                [Order(order_id=str(i), amount=Decimal(i)) for i in range(5)]
            )
        assert len(many.value.unconfirmed) == 5
        # The channel survives a return.
        queue = names.queue()
        await client.declare(mqkit.Queue(queue), mqkit.Binding(exchange, queue, "nobody.#"))
        assert await producer.publish(Order(order_id="2", amount=Decimal(2)))


async def test_missing_exchange_is_a_topology_error_and_the_client_recovers(
    client_for, names
) -> None:
    async with client_for() as client:
        producer = await client.producer(Order, exchange=names.exchange(), routing_key="k")
        with pytest.raises(mqkit.TopologyError, match="not found"):
            await producer.publish(Order(order_id="1", amount=Decimal(1)))
        other = await client.producer(Order, queue=names.queue())
        assert await other.publish(Order(order_id="2", amount=Decimal(2)))


# ------------------------------------------------------------------------------ connecting


async def test_wrong_credentials_fail_fast_with_the_password_masked(broker_url) -> None:
    parts = urlsplit(broker_url)
    secret = "not-the-Pa55word"
    url = urlunsplit(
        (
            parts.scheme,
            f"{parts.username}:{secret}@{parts.hostname}:{parts.port or 5672}",
            parts.path or "/",
            "",
            "",
        )
    )
    started = time.monotonic()
    with pytest.raises(mqkit.ConnectionFailed) as info:
        async with mqkit.AsyncClient(url=url, connect_timeout=8):
            pass
    assert time.monotonic() - started < 3  # not retried until connect_timeout
    assert "username or password" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in repr(info.value.__cause__)


async def test_unreachable_host_fails_within_connect_timeout(client_for) -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(mqkit.ConnectionFailed) as info:
        async with client_for(url=f"amqp://guest:hush-hush@127.0.0.1:{port}/", connect_timeout=1):
            pass
    assert time.monotonic() - started < 2.5
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "hush-hush" not in str(info.value)


async def test_unknown_vhost_says_so(broker_url, client_for) -> None:
    parts = urlsplit(broker_url)
    url = urlunsplit((parts.scheme, parts.netloc, "/no-such-vhost-here", "", ""))
    with pytest.raises(mqkit.ConnectionFailed, match="virtual host 'no-such-vhost-here'"):
        async with client_for(url=url, connect_timeout=3):
            pass


async def test_fail_over_to_the_second_url(client_for, broker_url, names) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    async with client_for(urls=[dead, broker_url]) as client:
        producer = await client.producer(Order, queue=names.queue())
        assert await producer.publish(Order(order_id="1", amount=Decimal(1)))
        health = client.health()
        assert health.connected and health.url.endswith(
            urlsplit(broker_url).netloc.split("@")[-1] + "/"
        )


async def test_using_a_client_before_connecting_is_explained(client_for, names) -> None:
    client = client_for()
    with pytest.raises(mqkit.ConnectionFailed, match="not connected"):
        await client.declare(mqkit.Queue(names.queue()))
    await client.close()
    await client.close()  # idempotent


# ------------------------------------------------------------------------------ topology


async def test_redeclare_conflict_is_a_topology_error(client_for, names) -> None:
    queue = names.queue()
    async with client_for(declare="strict") as client:  # by default: used as it is
        await client.declare(mqkit.Queue(queue, type="classic"))
        await client.declare(mqkit.Queue(queue, type="classic"))  # cached: nothing to do
        with pytest.raises(mqkit.TopologyError) as info:
            await client.declare(mqkit.Queue(queue, type="quorum"))
        message = str(info.value)
        assert queue in message and "x-queue-type" in message
        assert "queue_type='classic'" in message
        # the declare channel was replaced
        await client.declare(mqkit.Queue(names.queue()))
        assert [e.type for e in client.topology if e.name == queue] == ["classic"]  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ bad bodies


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"{nope", "not valid JSON"), (b'{"order_id": "1", "amount": "lots"}', "amount")],
    ids=["malformed-json", "schema-invalid"],
)
async def test_undecodable_bodies_are_dead_lettered_and_consuming_goes_on(
    client_for, names, raw, body, reason
) -> None:
    queue = names.queue()
    got = Recorder()
    async with client_for() as client, client.consumer(queue, Order, got):
        await asyncio.to_thread(raw.publish, queue, body, properties=json_props(message_id="bad"))
        await eventually(lambda: raw.count(f"{queue}.dlq") == 1, what="the dead letter")
        await asyncio.to_thread(raw.publish, queue, b'{"order_id": "2", "amount": "2"}')
        [message] = await got.wait(1)
    assert message.order_id == "2"
    [(_, props, dead)] = raw.drain(f"{queue}.dlq")
    assert dead == body and props.message_id == "bad"
    assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
    assert reason in text(props.headers["x-mqkit-error-message"])
    assert int(props.headers["x-mqkit-attempts"]) == 1


# ------------------------------------------------------------------------------ retries


async def test_retry_succeeds_on_attempt_three_after_the_delays(client_for, names, raw) -> None:
    queue = names.queue()

    def flaky(message: Order, ctx: mqkit.Context) -> None:
        if ctx.attempt < 3:
            raise ConnectionError(f"transient {ctx.attempt}")

    got = Recorder(flaky)
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.2, 0.4))
    async with client_for() as client, client.consumer(queue, Order, got, retry=policy):
        producer = await client.producer(Order, queue=queue)
        await producer.publish(Order(order_id="1", amount=Decimal(1)))
        await got.wait(3)
        await asyncio.sleep(0.3)
    assert [ctx.attempt for _, ctx in got.items] == [1, 2, 3]
    # The broker held each retry for its delay: never early.
    assert got.times[1] - got.times[0] >= 0.2 - 0.02
    assert got.times[2] - got.times[1] >= 0.4 - 0.02
    assert raw.count(f"{queue}.dlq") == 0
    assert raw.count(queue) == 0


async def test_permanent_failure_is_dead_lettered_with_every_header(client_for, names, raw) -> None:
    queue = names.queue()
    service = names.service()

    def broken(message: Order, ctx: mqkit.Context) -> None:
        raise ValueError(f"cannot handle {message.order_id}")

    got = Recorder(broken)
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,))
    async with (
        client_for(service=service) as client,
        client.consumer(queue, Order, got, retry=policy),
    ):
        producer = await client.producer(Order, queue=queue)
        message_id = await producer.publish(Order(order_id="7", amount=Decimal(7)))
        await eventually(lambda: raw.count(f"{queue}.dlq") == 1, what="the dead letter")
    assert len(got.items) == 3
    [(_, props, body)] = raw.drain(f"{queue}.dlq")
    assert json.loads(body)["order_id"] == "7"
    assert props.message_id == message_id
    headers = {k: text(v) for k, v in props.headers.items()}
    for name in mqkit.dead_letters.DEAD_LETTER_HEADERS:
        assert name in headers, name
    assert headers["x-mqkit-error-type"] == "ValueError"
    assert headers["x-mqkit-error-message"] == "cannot handle 7"
    assert headers["x-mqkit-attempts"] == "3"
    assert headers["x-mqkit-original-queue"] == queue
    assert headers["x-mqkit-original-routing-key"] == queue
    assert headers["x-mqkit-service"] == service
    assert "ValueError" in headers["x-mqkit-traceback"]


async def test_reject_dead_letters_at_once(client_for, names, raw) -> None:
    queue = names.queue()

    def refuse(message: Order, ctx: mqkit.Context) -> None:
        raise mqkit.Reject("not for us")

    got = Recorder(refuse)
    policy = mqkit.RetryPolicy(delays=(0.1,))
    async with client_for() as client, client.consumer(queue, Order, got, retry=policy):
        producer = await client.producer(Order, queue=queue)
        await producer.publish(Order(order_id="1", amount=Decimal(1)))
        await eventually(lambda: raw.count(f"{queue}.dlq") == 1, what="the dead letter")
    assert len(got.items) == 1
    [(_, props, _)] = raw.drain(f"{queue}.dlq")
    assert text(props.headers["x-mqkit-error-type"]) == "Reject"
    assert text(props.headers["x-mqkit-error-message"]) == "not for us"
    assert int(props.headers["x-mqkit-attempts"]) == 1


async def test_a_handler_raising_cancelled_error_is_a_failure_not_a_dead_worker(
    client_for, names, raw
) -> None:
    """A CancelledError from something the handler awaited (not a stop) must not end the
    worker: the delivery is settled (dead-lettered) and the next one is handled."""
    queue = names.queue()

    async def cancelled_inside(message: Order, ctx: mqkit.Context) -> None:
        if message.order_id == "1":
            inner = asyncio.get_running_loop().create_future()
            inner.cancel()
            await inner  # raises CancelledError, though the worker is not being cancelled

    got = Recorder(cancelled_inside)
    policy = mqkit.RetryPolicy(max_attempts=1, delays=())
    async with client_for() as client:
        consumer = client.consumer(queue, Order, got, retry=policy, concurrency=1)
        async with consumer:
            producer = await client.producer(Order, queue=queue)
            await producer.publish(Order(order_id="1", amount=Decimal(1)))
            await producer.publish(Order(order_id="2", amount=Decimal(2)))
            assert [m.order_id for m in await got.wait(2)] == ["1", "2"]
            await eventually(lambda: raw.count(f"{queue}.dlq") == 1, what="the dead letter")
            assert all(not w.done() for w in consumer._workers)
    [(_, props, _)] = raw.drain(f"{queue}.dlq")
    assert text(props.headers["x-mqkit-error-type"]) == "CancelledError"
    assert raw.count(queue) == 0  # nothing left unacked and given back on close


async def test_immediate_retries_happen_in_process(client_for, names, raw) -> None:
    queue = names.queue()
    calls: list[int] = []

    def twice_broken(message: Order, ctx: mqkit.Context) -> None:
        calls.append(ctx.attempt)
        if len(calls) < 3:
            raise TimeoutError("blip")

    got = Recorder(twice_broken)
    policy = mqkit.RetryPolicy(max_attempts=1, delays=(), immediate=2)
    async with client_for() as client, client.consumer(queue, Order, got, retry=policy):
        producer = await client.producer(Order, queue=queue)
        await producer.publish(Order(order_id="1", amount=Decimal(1)))
        await eventually(lambda: len(calls) == 3, what="three calls")
        await asyncio.sleep(0.2)
    assert calls == [1, 1, 1]  # quick retries do not count as attempts
    assert raw.count(f"{queue}.dlq") == 0


# ------------------------------------------------------------------------------ stop / concurrency


async def test_graceful_stop_finishes_in_flight_and_returns_the_rest(
    client_for, names, raw
) -> None:
    queue = names.queue()
    started = asyncio.Event()

    async def slow(message: Order, ctx: mqkit.Context) -> None:
        if message.order_id == "0":
            started.set()
            await asyncio.sleep(0.8)

    got = Recorder(slow)
    async with client_for() as client:
        producer = await client.producer(Order, queue=queue)
        await producer.publish_many([Order(order_id=str(i), amount=Decimal(i)) for i in range(5)])
        consumer = client.consumer(queue, Order, got, prefetch=10)
        await consumer.start()
        await asyncio.wait_for(started.wait(), 10)
        begun = time.monotonic()
        await consumer.stop(timeout=5)
        assert time.monotonic() - begun >= 0.5  # it waited for the handler
        await consumer.stop()  # idempotent
        assert [m.order_id for m in got.messages] == ["0"]
        # The in-flight one was acked; the four prefetched ones are back, ready.
        await eventually(lambda: raw.count(queue) == 4, what="4 messages back in the queue")
        # ...and a new consumer gets exactly those.
        again = Recorder()
        async with client.consumer(queue, Order, again):
            await again.wait(4)
            await asyncio.sleep(0.2)
    assert sorted(m.order_id for m in again.messages) == ["1", "2", "3", "4"]


async def test_stop_timeout_gives_the_message_back(client_for, names, raw) -> None:
    queue = names.queue()

    async def stuck(message: Order, ctx: mqkit.Context) -> None:
        await asyncio.sleep(30)

    got = Recorder(stuck)
    async with client_for() as client:
        producer = await client.producer(Order, queue=queue)
        await producer.publish(Order(order_id="1", amount=Decimal(1)))
        consumer = client.consumer(queue, Order, got)
        await consumer.start()
        await got.wait(1)
        begun = time.monotonic()
        await consumer.stop(timeout=0.3)
        assert time.monotonic() - begun < 5
    await asyncio.sleep(0.2)
    assert raw.count(queue) == 1


async def test_stop_keeps_to_its_timeout_when_the_broker_does_not_answer(names, broker_url) -> None:
    # As on Client: a busy handler and a broker that does not answer the cancel; the cancel,
    # the wait for the handler and the close share one deadline (plus the documented slack).
    # The cancel used to wait its full 30 s channel timeout here.
    queue = names.queue()
    release = asyncio.Event()

    async def busy(message: Order, ctx: mqkit.Context) -> None:
        await asyncio.wait_for(release.wait(), 10)

    got = Recorder(busy)
    with FaultProxy(broker_url) as proxy:
        async with mqkit.AsyncClient(url=proxy.url, connect_timeout=5) as client:
            producer = await client.producer(Order, queue=queue)
            await producer.publish(Order(order_id="1", amount=Decimal(1)))
            consumer = client.consumer(queue, Order, got)
            await consumer.start()
            await got.wait(1)
            proxy.blackhole()
            started = time.monotonic()
            await consumer.stop(timeout=1)
            took = time.monotonic() - started
            release.set()
            proxy.restore()
    assert took < 1 + 1.0 + 1.5  # timeout, the documented slack, scheduling noise


async def test_concurrency_bounds_handlers_running_at_once(client_for, names) -> None:
    queue = names.queue()
    running = 0
    peak = 0

    async def busy(message: Order, ctx: mqkit.Context) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1)
        running -= 1

    got = Recorder(busy)
    async with client_for() as client:
        producer = await client.producer(Order, queue=queue)
        await producer.publish_many([Order(order_id=str(i), amount=Decimal(i)) for i in range(12)])
        async with client.consumer(queue, Order, got, concurrency=3, prefetch=20):
            await got.wait(12)
            await eventually(lambda: running == 0)
    assert peak == 3


async def test_starting_a_consumer_twice_at_once_starts_it_once(client_for, names) -> None:
    queue = names.queue()
    got = Recorder()

    def workers() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "AsyncConsumer._work"
        )

    async with client_for() as client:
        consumer = client.consumer(queue, Order, got, concurrency=2)
        await asyncio.gather(consumer.start(), consumer.start())
        assert consumer.started and consumer.attached
        assert workers() == 2  # not 4: the second start waited for the first
        await consumer.stop()
        await eventually(lambda: workers() == 0, what="the workers to end")


async def test_run_until_stop(client_for, names) -> None:
    queue = names.queue()
    got = Recorder()
    async with client_for() as client:
        consumer = client.consumer(queue, Order, got)
        runner = asyncio.create_task(client.run())
        await eventually(lambda: consumer.started, what="the consumer to start")
        producer = await client.producer(Order, queue=queue)
        await producer.publish(Order(order_id="1", amount=Decimal(1)))
        await got.wait(1)
        assert client.health().ready
        client.stop()
        await asyncio.wait_for(runner, 10)
        assert not consumer.started
        assert client.health().consumers == 0


RUN_SCRIPT = """
import asyncio, sys
import mqkit
from pydantic import BaseModel

class Tick(BaseModel):
    n: int

async def main():
    async with mqkit.AsyncClient(url=sys.argv[1]) as client:
        async def handle(message, ctx):
            pass
        consumer = client.consumer(sys.argv[2], Tick, handle)
        runner = asyncio.create_task(client.run())
        while not consumer.started:
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await runner
        print("stopped", consumer.started, flush=True)

asyncio.run(main())
"""


async def test_run_ends_on_sigterm(broker_url, names) -> None:
    import signal
    import sys

    process = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, broker_url, names.queue()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == "ready"
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out.strip() == "stopped False"


# ------------------------------------------------------------------------------ event bus


async def test_two_services_two_instances_each_get_every_event_once(client_for, names) -> None:
    exchange = names.exchange()
    services = [names.service(), names.service()]
    per_service: dict[str, list[Recorder]] = {s: [Recorder(), Recorder()] for s in services}
    clients = [client_for(service=s) for s in services for _ in range(2)]
    for client in clients:
        await client.connect()
    try:
        buses = []
        for index, client in enumerate(clients):
            bus = client.event_bus(exchange=exchange)
            bus.subscribe(AsyncOrderPlaced, per_service[client.settings.service][index % 2])
            await bus.start()
            buses.append(bus)
        for i in range(20):
            await buses[i % 4].publish(AsyncOrderPlaced(order_id=str(i)))
        for service in services:
            await eventually(lambda s=service: sum(len(r.items) for r in per_service[s]) >= 20)
        await asyncio.sleep(0.5)
        for service in services:
            ids = [m.order_id for r in per_service[service] for m in r.messages]
            assert sorted(ids, key=int) == [str(i) for i in range(20)], service  # once each
            assert all(r.items for r in per_service[service])  # the instances competed
    finally:
        for client in clients:
            await client.close()


async def test_a_bus_declares_its_exchange_once_not_per_publish(client_for, names) -> None:
    async with client_for(service=names.service()) as client:
        bus = client.event_bus(exchange=names.exchange())
        declarer = client._declarer
        calls: list[Any] = []
        declare = declarer.declare

        async def counting(entities: Any, **kw: Any) -> None:
            calls.append(list(entities))
            await declare(entities, **kw)

        declarer.declare = counting
        try:
            for n in range(3):
                await bus.publish(AsyncCacheCleared(key=str(n)))
        finally:
            del declarer.declare
        assert len(calls) == 1


async def test_pattern_and_broadcast_subscriptions(client_for, names, raw) -> None:
    exchange = names.exchange()
    service = names.service()
    pattern = Recorder()
    first, second = Recorder(), Recorder()
    async with client_for(service=service) as one, client_for(service=service) as two:
        bus_one = one.event_bus(exchange=exchange)
        bus_two = two.event_bus(exchange=exchange)
        bus_one.subscribe("asyncrt.orders.*", pattern)

        @bus_one.subscribe(AsyncCacheCleared, broadcast=True)
        async def on_one(event: AsyncCacheCleared, ctx: mqkit.Context) -> None:
            await first(event, ctx)

        bus_two.subscribe(AsyncCacheCleared, second, broadcast=True)
        with pytest.raises(mqkit.ConfigError):
            bus_one.subscribe("asyncrt.orders.*", pattern)
        async with bus_one, bus_two:
            await bus_two.publish(AsyncOrderPlaced(order_id="1"))
            await bus_two.publish(AsyncOrderShipped(order_id="2"))
            await bus_one.publish(AsyncCacheCleared(key="prices"))
            await pattern.wait(2)
            await first.wait(1)
            await second.wait(1)
            # An event type nobody defined goes to the pattern queue's DLQ, with the reason.
            await asyncio.to_thread(
                raw.publish,
                "asyncrt.orders.unknown",
                b"{}",
                exchange=exchange,
                properties=json_props(type="asyncrt.orders.nobody", message_id="u-1"),
            )
            dlq = f"{service}.asyncrt.orders._star_.dlq"
            await eventually(lambda: raw.count(dlq) == 1, what="the unknown event dead-lettered")
            with pytest.raises(mqkit.PublishUnroutable):
                await bus_one.publish(
                    AsyncCacheCleared(key="x"), routing_key="none.here", mandatory=True
                )
    assert {type(m) for m in pattern.messages} == {AsyncOrderPlaced, AsyncOrderShipped}
    assert first.messages == second.messages == [AsyncCacheCleared(key="prices")]
    [(_, props, _)] = raw.drain(dlq)
    assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
    assert "asyncrt.orders.nobody" in text(props.headers["x-mqkit-error-message"])


# ------------------------------------------------------------------------------ rpc


async def test_rpc(client_for, names) -> None:
    queue, lonely, broken, wrong = names.queue(), names.queue(), names.queue(), names.queue()

    async def answer(request: Order, ctx: mqkit.Context) -> Receipt:
        return Receipt(order_id=request.order_id, ok=True)

    async def explode(request: Order, ctx: mqkit.Context) -> Receipt:
        raise KeyError("no such order")

    async def sloppy(request: Order, ctx: mqkit.Context) -> Any:
        return 42

    async with client_for() as client:
        await client.declare(mqkit.Queue(lonely))
        async with (
            client.responder(queue, Order, answer),
            client.responder(broken, Order, explode),
            client.responder(wrong, Order, sloppy),
        ):
            order = Order(order_id="9", amount=Decimal(1))
            replies = await asyncio.gather(
                *(client.request(queue, order, Receipt) for _ in range(10))
            )
            assert replies == [Receipt(order_id="9", ok=True)] * 10
            with pytest.raises(mqkit.RemoteError) as remote:
                await client.request(broken, order, Receipt)
            assert remote.value.error_type == "KeyError"
            assert "no such order" in remote.value.error_message
            with pytest.raises(mqkit.RemoteError, match="returned int; return a pydantic model"):
                await client.request(wrong, order, Receipt)
            started = time.monotonic()
            with pytest.raises(mqkit.RequestTimeout, match="is a responder running"):
                await client.request(lonely, order, Receipt, timeout=0.5)
            assert time.monotonic() - started < 2
            with pytest.raises(mqkit.PublishUnroutable):
                await client.request(names.queue(), order, Receipt)
            # still fine afterwards
            assert await client.request(queue, order, Receipt) == Receipt(order_id="9", ok=True)


# ------------------------------------------------------------------------------ dead letters


async def test_dead_letters_peek_count_export_replay_purge(client_for, names, raw) -> None:
    queue = names.queue()
    healed = False

    def sometimes(message: Order, ctx: mqkit.Context) -> None:
        if healed:
            return
        if message.order_id.startswith("r"):
            raise mqkit.Reject("rejected")
        raise ValueError("broken")

    got = Recorder(sometimes)
    async with client_for() as client:
        dead = client.dead_letters(queue)
        with pytest.raises(mqkit.TopologyError, match="does not exist"):
            await dead.count()
        async with client.consumer(queue, Order, got, retry=mqkit.RetryPolicy(max_attempts=1)):
            producer = await client.producer(Order, queue=queue)
            await producer.publish_many(
                [Order(order_id=i, amount=Decimal(1)) for i in ("v1", "r1", "v2", "r2", "v3")]
            )
            await eventually(lambda: raw.count(f"{queue}.dlq") == 5, what="5 dead letters")
            assert await dead.count() == 5
            letters = await dead.peek(3)
            assert [letter.error_type for letter in letters] == [
                "ValueError",
                "Reject",
                "ValueError",
            ]
            assert letters[0].original_queue == queue and letters[0].attempts == 1
            assert await dead.count() == 5  # peeking removes nothing
            out = io.StringIO()
            assert await dead.export(out) == 5
            rows = [json.loads(line) for line in out.getvalue().splitlines()]
            assert [r["error_type"] for r in rows].count("Reject") == 2
            assert await dead.count() == 5
            healed = True
            seen: list[int] = []
            assert await dead.replay(error_type="ValueError", progress=seen.append) == 3
            assert seen == [1, 2, 3]
            await eventually(lambda: len(got.items) == 8, what="the replayed messages")
            assert await dead.count() == 2
            remaining = await dead.peek()
            assert {letter.message_id for letter in remaining} == {
                row["message_id"] for row in rows if row["error_type"] == "Reject"
            }
            assert await dead.replay(limit=1) == 1
            assert await dead.purge() == 1
            assert await dead.count() == 0
    replayed = [ctx for m, ctx in got.items[5:]]
    assert all(ctx.attempt == 1 for ctx in replayed)
    assert all("x-mqkit-error-type" not in ctx.headers for ctx in replayed)


# ------------------------------------------------------------------------------ reconnect


def _close_connection(ctl: Any, marker: str) -> int:
    """Close (broker side) every connection whose client properties mention ``marker``
    (``ctl``: the ``broker_ctl`` fixture, rabbitmqctl for the test broker)."""
    listing = ctl.run("-q", "--no-table-headers", "list_connections", "pid", "client_properties")
    pids = [line.split()[0] for line in listing.splitlines() if marker in line]
    for pid in pids:
        ctl.run("close_connection", pid, "test")
    return len(pids)


@pytest.mark.fault
async def test_reconnect_restores_consumers_and_publishing(
    client_for, names, raw, broker_ctl
) -> None:
    queue = names.queue()
    exclusive = mqkit.Queue(names.queue(), type="classic", durable=False, exclusive=True)
    got = Recorder()
    service = names.service()
    async with client_for(service=service) as client:
        await client.declare(exclusive)
        producer = await client.producer(Order, queue=queue)
        async with client.consumer(queue, Order, got):
            await producer.publish(Order(order_id="1", amount=Decimal(1)))
            await got.wait(1)
            assert client.health().ready
            marker = f"mqkit:{service} ("  # the connection names (mqkit.shell.connection_name)
            # Both of the client's connections: publishing, and consuming/declaring.
            assert await asyncio.to_thread(_close_connection, broker_ctl, marker) == 2
            await eventually(
                lambda: client.health().reconnects >= 1 and client.health().ready,
                timeout=20,
                what="the reconnect",
            )
            health = client.health()
            assert health.consumers == health.consumers_attached == 1
            assert "CONNECTION_FORCED" in (health.last_error or "")
            await producer.publish(Order(order_id="2", amount=Decimal(2)))
            await got.wait(2)
            # The topology was re-declared on the new connection (an exclusive queue died with
            # the old one): a mandatory publish to it is routable again.
            direct = await client.producer(Order, exchange="", routing_key=exclusive.name)
            assert await direct.publish(Order(order_id="3", amount=Decimal(3)))
    assert [m.order_id for m in got.messages][-1] == "2"


class _LoseTheLinkOnFirstRestore:
    """A restorable (registered before the consumer) that closes the new connection the
    first time the link restores it: the connection is lost while consumers are restored."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.restores = 0

    def _link_lost(self, reason: BaseException) -> None:
        pass

    async def _restore(self) -> None:
        self.restores += 1
        if self.restores == 1:
            await self.link._connection.close()


@pytest.mark.fault
async def test_a_connection_lost_while_restoring_is_replaced(client_for, names) -> None:
    queue = names.queue()
    got = Recorder()
    async with client_for() as client:
        link = client._link
        flaky = _LoseTheLinkOnFirstRestore(link)
        link.register(flaky)
        async with client.consumer(queue, Order, got) as consumer:
            producer = await client.producer(Order, queue=queue)
            await link._connection.close()  # the first loss
            await eventually(
                lambda: flaky.restores >= 2 and client.health().connected and consumer.attached,
                timeout=20,
                what="a second reconnect after the connection was lost while restoring",
            )
            assert client.health().reconnects >= 2
            assert await producer.publish(Order(order_id="1", amount=Decimal(1)))
            assert [m.order_id for m in await got.wait(1)] == ["1"]
        link.unregister(flaky)


async def test_a_deleted_queue_is_declared_again_and_consumed(
    client_for, names, broker_url
) -> None:
    def delete_queue() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()

    queue = names.queue()
    got = Recorder()
    async with client_for() as client:
        consumer = client.consumer(queue, Order, got)
        async with consumer:
            producer = await client.producer(Order, queue=queue)
            await producer.publish(Order(order_id="1", amount=Decimal(1)))
            await got.wait(1)
            await asyncio.to_thread(delete_queue)

            async def routable() -> bool:
                try:
                    await producer.publish(Order(order_id="2", amount=Decimal(2)))
                except mqkit.PublishUnroutable:
                    return False  # not declared again yet
                return True

            await eventually(routable, what="the queue to be declared again")
            await got.wait(2)
            # Deliveries may reach the handler a moment before consume-ok is processed.
            await eventually(lambda: consumer.attached, timeout=5, what="attached again")
        assert client.health().consumers == 0


@pytest.mark.fault
async def test_publish_during_an_outage_times_out_then_resumes(names, broker_url) -> None:
    queue = names.queue()
    with FaultProxy(broker_url) as proxy:
        async with mqkit.AsyncClient(url=proxy.url, confirm_timeout=1, connect_timeout=5) as client:
            producer = await client.producer(Order, queue=queue)
            assert await producer.publish(Order(order_id="1", amount=Decimal(1)))
            proxy.refuse(True)
            proxy.cut()
            await eventually(lambda: not client.health().connected, what="the loss")
            started = time.monotonic()
            with pytest.raises(mqkit.PublishTimeout) as info:
                await producer.publish(Order(order_id="2", amount=Decimal(2)))
            assert 0.8 < time.monotonic() - started < 3
            assert len(info.value.unconfirmed) == 1
            with pytest.raises(mqkit.PublishTimeout):
                await producer.publish_many([Order(order_id="3", amount=Decimal(3))] * 3)
            proxy.refuse(False)
            await eventually(lambda: client.health().connected, timeout=15, what="the reconnect")
            assert await producer.publish(Order(order_id="4", amount=Decimal(4)))
            assert client.health().reconnects >= 1


@pytest.mark.fault
async def test_publish_and_request_keep_their_deadline_on_a_link_that_does_not_answer(
    names, broker_url
) -> None:
    """Opening the publishing channel on a black-holed link must not outlast the caller's
    timeout, nor may a second publish waiting for the first to open it."""
    queue = names.queue()
    with FaultProxy(broker_url) as proxy:
        async with mqkit.AsyncClient(url=proxy.url, confirm_timeout=1, connect_timeout=5) as client:
            producer = await client.producer(Order, queue=queue)  # declares; opens no channel
            assert client._publisher._channel is None
            proxy.blackhole()
            try:
                started = time.monotonic()
                outcomes = await asyncio.wait_for(
                    asyncio.gather(
                        producer.publish(Order(order_id="1", amount=Decimal(1))),
                        producer.publish(Order(order_id="2", amount=Decimal(2))),
                        client.request(
                            queue, Order(order_id="3", amount=Decimal(3)), Receipt, timeout=1.5
                        ),
                        return_exceptions=True,
                    ),
                    20,  # a backstop: a hang fails the test instead of stalling it
                )
                elapsed = time.monotonic() - started
            finally:
                proxy.restore()
            assert [type(o) for o in outcomes] == [
                mqkit.PublishTimeout,
                mqkit.PublishTimeout,
                mqkit.RequestTimeout,
            ], outcomes
            assert elapsed < 4, f"took {elapsed:.2f}s"
            await eventually(lambda: client.health().connected, timeout=15, what="the link")
            assert await producer.publish(Order(order_id="4", amount=Decimal(4)))


# ------------------------------------------------------------------ awaitable factories


async def test_factories_that_do_no_io_can_be_awaited_too(client_for, names) -> None:
    """The public API: AsyncClient's methods are awaitable. consumer(), responder(), event_bus() and
    dead_letters() do no I/O and return their object at once; awaiting it gives the same."""

    class Ping(BaseModel):
        n: int

    async def handle(message: Ping, ctx: mqkit.Context) -> None:
        return None

    async def answer(message: Ping, ctx: mqkit.Context) -> Ping:
        return message

    queue = names.queue()
    async with client_for(service=names.service()) as client:
        consumer = client.consumer(queue, Ping, handle)
        assert await consumer is consumer
        awaited = await client.consumer(queue, Ping, handle)
        assert isinstance(awaited, mqkit.AsyncConsumer)
        responder = await client.responder(names.queue(), Ping, answer)
        assert isinstance(responder, mqkit.AsyncConsumer)
        bus = await client.event_bus(exchange=names.exchange())
        assert isinstance(bus, mqkit.AsyncEventBus)
        dlq = await client.dead_letters(queue)
        assert isinstance(dlq, mqkit.AsyncDeadLetterQueue)
        assert dlq.name == f"{queue}.dlq"
