"""The blocking runtime on its own: ``Client`` on pika, used the way a threaded service does.

The shared behaviour suite (``rt`` fixture) covers what both runtimes must do; these tests
cover what only the blocking side can show (worker threads, heartbeats while a handler
blocks, sharing a producer across threads, ``run()`` and signals) plus the end-to-end paths
of every feature against the real broker.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pika
import pytest
from pydantic import BaseModel

import mqkit
from mqkit.dead_letters import DEAD_LETTER_HEADERS
from mqkit.settings import mask_url
from mqkit.testing import FaultProxy


class Order(BaseModel):
    order_id: str
    amount: Decimal


class Receipt(BaseModel):
    order_id: str
    ok: bool


class SyncOrderPlaced(mqkit.Event, event_type="syncrt.orders.placed"):
    order_id: str


class SyncOrderShipped(mqkit.Event, event_type="syncrt.orders.shipped"):
    order_id: str


class SyncCacheCleared(mqkit.Event, event_type="syncrt.cache.cleared"):
    key: str


def order(i: int | str) -> Order:
    return Order(order_id=str(i), amount=Decimal(str(i)) if str(i).isdigit() else Decimal(1))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def json_props(**kwargs: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, **kwargs)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eventually(predicate: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


class Recorder:
    """A thread-safe handler that records (message, ctx) and then runs ``behaviour``."""

    def __init__(self, behaviour: Any = None) -> None:
        self.items: list[tuple[Any, mqkit.Context]] = []
        self.lock = threading.Lock()
        self.behaviour = behaviour

    def __call__(self, message: Any, ctx: mqkit.Context) -> Any:
        with self.lock:
            self.items.append((message, ctx))
        if self.behaviour is not None:
            return self.behaviour(message, ctx)
        return None

    @property
    def messages(self) -> list[Any]:
        with self.lock:
            return [m for m, _ in self.items]

    @property
    def contexts(self) -> list[mqkit.Context]:
        with self.lock:
            return [c for _, c in self.items]

    def wait(self, count: int, timeout: float = 10.0) -> list[Any]:
        eventually(lambda: len(self.items) >= count, timeout, f"{count} messages")
        return self.messages


@pytest.fixture
def client_for(broker_url: str):  # type: ignore[no-untyped-def]
    """``client_for(**overrides)``: an (unconnected) Client on the test broker."""

    def make(**overrides: Any) -> mqkit.Client:
        overrides.setdefault("url", broker_url)
        overrides.setdefault("connect_timeout", 10)
        return mqkit.Client(**overrides)

    return make


# ---------------------------------------------------------------------------- round trip


def test_round_trip_keeps_fields_ids_correlation_and_headers(client_for, names) -> None:
    queue = names.queue()
    got = Recorder()
    with client_for(service=names.service()) as client:  # its retry tiers go with the names
        producer = client.producer(Order, queue=queue)
        sent = Order(order_id="42", amount=Decimal("9.90"))
        message_id = producer.publish(
            sent, message_id="m-42", correlation_id="c-42", headers={"tenant": "acme", "n": 7}
        )
        assert message_id == "m-42"
        with client.consumer(queue, Order, got):
            got.wait(1)
    message, ctx = got.items[0]
    assert message == sent and isinstance(message.amount, Decimal)
    assert ctx.message_id == "m-42"
    assert ctx.correlation_id == "c-42"
    assert ctx.headers["tenant"] == "acme" and ctx.headers["n"] == 7
    assert ctx.attempt == 1 and ctx.redelivered is False
    assert ctx.queue == queue and ctx.exchange == "" and ctx.routing_key == queue
    assert ctx.event_type == "Order"
    assert ctx.timestamp is not None and ctx.timestamp.tzinfo is not None


def test_wire_format_is_plain_amqp(client_for, names, raw) -> None:
    queue = names.queue()
    with client_for(service="sync-wire") as client:
        client.producer(Order, queue=queue).publish(order(5), priority=3, expiration=60)
    [(_method, props, body)] = raw.drain(queue)
    assert json.loads(body) == {"order_id": "5", "amount": "5"}
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.app_id == "sync-wire"
    assert props.type == "Order"
    assert props.message_id and props.timestamp
    assert props.priority == 3 and props.expiration == "60000"


# ---------------------------------------------------------------------------- connecting


def test_wrong_credentials_fail_fast_without_the_password(broker_url) -> None:
    url = broker_url.replace("guest:guest@", "guest:s3cr3t-pw@")
    started = time.monotonic()
    with pytest.raises(mqkit.ConnectionFailed) as info, mqkit.Client(url=url, connect_timeout=10):
        pass
    assert time.monotonic() - started < 3  # refused credentials are not retried
    message = str(info.value)
    assert "wrong username or password" in message
    assert "s3cr3t-pw" not in message and "s3cr3t-pw" not in repr(info.value)
    assert "***" in message


def test_unreachable_host_fails_within_connect_timeout(broker_url) -> None:
    port = closed_port()
    client = mqkit.Client(url=f"amqp://guest:hidden-pw@127.0.0.1:{port}/", connect_timeout=1.5)
    assert "hidden-pw" not in repr(client)
    started = time.monotonic()
    with pytest.raises(mqkit.ConnectionFailed) as info, client:
        pass
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 5
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "hidden-pw" not in message


def test_unknown_vhost_says_so(broker_url) -> None:
    url = broker_url.rstrip("/") + "/no-such-vhost"
    with pytest.raises(mqkit.ConnectionFailed, match="no-such-vhost"), mqkit.Client(url=url):
        pass


def test_fail_over_to_the_next_url(broker_url, names) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    with mqkit.Client(urls=[dead, broker_url], connect_timeout=10) as client:
        health = client.health()
        assert health.connected and health.url == mask_url(broker_url)
        assert client.producer(Order, queue=names.queue()).publish(order(1))


# ---------------------------------------------------------------------------- topology


def test_redeclare_conflict_is_a_topology_error_and_the_client_carries_on(
    client_for, names
) -> None:
    queue = names.queue()
    with client_for(declare="strict") as client:  # by default it would be used as it is
        client.declare(mqkit.Queue(queue, type="classic"))
        with pytest.raises(mqkit.TopologyError) as info:
            client.declare(mqkit.Queue(queue, type="quorum"))
        message = str(info.value)
        assert queue in message and "x-queue-type" in message
        assert "queue_type='classic'" in message
        assert client.producer(Order, queue=names.queue()).publish(order(1))


def test_publishing_to_a_missing_exchange_is_a_topology_error(client_for, names) -> None:
    with client_for() as client:
        producer = client.producer(Order, exchange=names.exchange())
        with pytest.raises(mqkit.TopologyError, match="exchange"):
            producer.publish(order(1))
        # the publishing channel was replaced: other publishes go on
        assert client.producer(Order, queue=names.queue()).publish(order(2))


# ---------------------------------------------------------------------------- publishing


def test_unroutable_publish_and_publish_many(client_for, names) -> None:
    exchange = mqkit.Exchange(names.exchange())
    with client_for() as client:
        producer = client.producer(Order, exchange=exchange, routing_key="nowhere")
        with pytest.raises(mqkit.PublishUnroutable, match="nowhere") as info:
            producer.publish(order(1), message_id="u-1")
        assert info.value.unconfirmed == ["u-1"]
        with pytest.raises(mqkit.PublishUnroutable) as many:
            producer.publish_many([order(i) for i in range(5)])
        assert len(many.value.unconfirmed) == 5


def test_wrong_message_type_is_a_type_error(client_for, names) -> None:
    with client_for() as client:
        producer = client.producer(Order, queue=names.queue())
        with pytest.raises(TypeError, match=r"Producer\[Order\]\.publish expected Order, got dict"):
            producer.publish({"order_id": "1", "amount": "1"})  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            producer.publish_many([order(1), Receipt(order_id="1", ok=True)])  # type: ignore[list-item]


def test_publish_many_confirms_every_message(client_for, names, raw) -> None:
    queue = names.queue()
    with client_for() as client:
        ids = client.producer(Order, queue=queue).publish_many(order(i) for i in range(2000))
    assert len(ids) == len(set(ids)) == 2000
    drained = raw.drain(queue)
    assert [props.message_id for _m, props, _b in drained] == ids


def test_producer_shared_by_eight_threads(client_for, names, raw) -> None:
    queue = names.queue()
    per_thread = 60
    returned: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with client_for() as client:
        producer = client.producer(Order, queue=queue)
        barrier = threading.Barrier(8)

        def publish(thread: int) -> None:
            barrier.wait()
            try:
                for n in range(per_thread):
                    message_id = producer.publish(order(n), message_id=f"t{thread}-{n}")
                    with lock:
                        returned.append(message_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors
    expected = {f"t{t}-{n}" for t in range(8) for n in range(per_thread)}
    assert len(returned) == len(expected) and set(returned) == expected  # each confirmed once
    stored = [props.message_id for _m, props, _b in raw.drain(queue)]
    assert Counter(stored) == Counter(expected)  # stored exactly once each


@pytest.mark.fault
def test_publish_during_an_outage_times_out_then_resumes(names, broker_url) -> None:
    queue = names.queue()
    with (
        FaultProxy(broker_url) as proxy,
        mqkit.Client(url=proxy.url, confirm_timeout=1, connect_timeout=5) as client,
    ):
        producer = client.producer(Order, queue=queue)
        assert producer.publish(order(1))
        proxy.refuse(True)
        proxy.cut()
        eventually(lambda: not client.health().connected, what="the loss")
        started = time.monotonic()
        with pytest.raises(mqkit.PublishTimeout) as info:
            producer.publish(order(2), message_id="lost-2")
        assert 0.8 < time.monotonic() - started < 3
        assert info.value.unconfirmed == ["lost-2"]
        assert client.health().last_error
        proxy.refuse(False)
        eventually(lambda: client.health().connected, timeout=20, what="the reconnect")
        assert producer.publish(order(3))
        assert client.health().reconnects >= 1


# ---------------------------------------------------------------------------- heartbeats


def test_a_handler_longer_than_the_heartbeat_keeps_the_connection(client_for, names, raw) -> None:
    queue = names.queue()
    got = Recorder(lambda message, ctx: time.sleep(3.5))  # > 3 heartbeat intervals
    with client_for(heartbeat=1) as client:
        client.producer(Order, queue=queue).publish(order(1))
        with client.consumer(queue, Order, got):
            got.wait(1)
            time.sleep(4.5)  # the handler finishes and acks; a redelivery would show up
            health = client.health()
            assert health.connected and health.ready
            assert health.reconnects == 0 and health.last_error is None
        assert len(got.items) == 1
        assert got.contexts[0].redelivered is False
    assert raw.count(queue) == 0


# ---------------------------------------------------------------------------- consuming


def test_undecodable_bodies_are_dead_lettered_and_the_consumer_goes_on(
    client_for, names, raw
) -> None:
    queue = names.queue()
    got = Recorder()
    with client_for() as client:
        producer = client.producer(Order, queue=queue)
        with client.consumer(queue, Order, got):
            raw.publish(queue, b"{not json", properties=json_props(message_id="bad-json"))
            raw.publish(queue, b'{"order_id": 1}', properties=json_props(message_id="bad-schema"))
            producer.publish(order(7))
            got.wait(1)
            eventually(lambda: raw.count(f"{queue}.dlq") == 2, what="two dead letters")
    assert [m.order_id for m in got.messages] == ["7"]
    dead = {props.message_id: props for _m, props, _b in raw.drain(f"{queue}.dlq")}
    assert set(dead) == {"bad-json", "bad-schema"}
    for props in dead.values():
        assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
        assert int(props.headers["x-mqkit-attempts"]) == 1
    assert "JSON" in text(dead["bad-json"].headers["x-mqkit-error-message"])
    assert "amount" in text(dead["bad-schema"].headers["x-mqkit-error-message"])


def test_retries_with_short_delays_then_success(client_for, names, raw) -> None:
    queue = names.queue()
    stamps: list[float] = []

    def flaky(message: Order, ctx: mqkit.Context) -> None:
        stamps.append(time.monotonic())
        if ctx.attempt < 3:
            raise RuntimeError(f"flaky attempt {ctx.attempt}")

    got = Recorder(flaky)
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.2, 0.4))
    with client_for() as client:
        client.producer(Order, queue=queue).publish(order(1))
        with client.consumer(queue, Order, got, retry=policy):
            got.wait(3, timeout=15)
            time.sleep(0.3)
    assert [ctx.attempt for ctx in got.contexts] == [1, 2, 3]
    assert stamps[1] - stamps[0] >= 0.15 and stamps[2] - stamps[1] >= 0.3
    assert {ctx.message_id for ctx in got.contexts} == {got.contexts[0].message_id}
    assert raw.count(f"{queue}.dlq") == 0
    assert raw.count(queue) == 0


def test_permanent_failure_is_dead_lettered_with_every_header(client_for, names, raw) -> None:
    queue = names.queue()

    def broken(message: Order, ctx: mqkit.Context) -> None:
        raise ValueError("card declined")

    got = Recorder(broken)
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.2,))
    service = names.service()  # its retry tier goes with the names
    with client_for(service=service) as client:
        client.producer(Order, queue=queue).publish(order(9), message_id="perm-9")
        with client.consumer(queue, Order, got, retry=policy):
            eventually(lambda: raw.count(f"{queue}.dlq") == 1, timeout=15, what="dead letter")
    assert len(got.items) == 2
    [(_method, props, body)] = raw.drain(f"{queue}.dlq")
    assert json.loads(body)["order_id"] == "9"
    assert props.message_id == "perm-9"
    headers = props.headers
    assert set(DEAD_LETTER_HEADERS) <= set(headers)
    assert text(headers["x-mqkit-error-type"]) == "ValueError"
    assert text(headers["x-mqkit-error-message"]) == "card declined"
    assert "ValueError" in text(headers["x-mqkit-traceback"])
    assert int(headers["x-mqkit-attempts"]) == 2
    assert text(headers["x-mqkit-original-queue"]) == queue
    assert text(headers["x-mqkit-original-routing-key"]) == queue
    assert text(headers["x-mqkit-service"]) == service
    assert text(headers["x-mqkit-failed-at"]).endswith("+00:00")


def test_reject_dead_letters_at_once(client_for, names, raw) -> None:
    queue = names.queue()

    def reject(message: Order, ctx: mqkit.Context) -> None:
        raise mqkit.Reject("not for us")

    got = Recorder(reject)
    with client_for() as client:
        client.producer(Order, queue=queue).publish(order(1))
        with client.consumer(queue, Order, got):
            eventually(lambda: raw.count(f"{queue}.dlq") == 1, what="dead letter")
    assert len(got.items) == 1
    [(_method, props, _body)] = raw.drain(f"{queue}.dlq")
    assert text(props.headers["x-mqkit-error-type"]) == "Reject"
    assert text(props.headers["x-mqkit-error-message"]) == "not for us"
    assert int(props.headers["x-mqkit-attempts"]) == 1


def test_immediate_retries_run_in_process(client_for, names, raw, monkeypatch) -> None:
    import mqkit._sync.consumer as sync_consumer

    retriers: list[object] = []
    real = sync_consumer.tenacity

    class CountingTenacity:  # the consumer module's tenacity only (the link uses it too)
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def Retrying(self, *args: Any, **kwargs: Any) -> Any:
            retriers.append(kwargs)
            return real.Retrying(*args, **kwargs)

    monkeypatch.setattr(sync_consumer, "tenacity", CountingTenacity())
    queue = names.queue()
    calls: list[int] = []

    def twice_broken(message: Order, ctx: mqkit.Context) -> None:
        calls.append(ctx.attempt)
        if message.order_id == "1" and len(calls) < 3:
            raise ConnectionResetError("blip")

    policy = mqkit.RetryPolicy(max_attempts=1, immediate=2)
    with client_for() as client:
        client.producer(Order, queue=queue).publish(order(1))
        with client.consumer(queue, Order, Recorder(twice_broken), retry=policy):
            eventually(lambda: len(calls) == 3, what="three calls")
            eventually(lambda: raw.count(queue) == 0, what="the ack")
            client.producer(Order, queue=queue).publish(order(2))
            eventually(lambda: len(calls) == 4, what="the second message")
            eventually(lambda: raw.count(queue) == 0, what="the second ack")
    assert calls == [1, 1, 1, 1]  # in-process retries are not attempts
    assert raw.count(f"{queue}.dlq") == 0
    assert len(retriers) == 1  # built for the failure only, not for the message that succeeded


def test_concurrency_runs_handlers_in_parallel_on_worker_threads(
    client_for, names, raw, caplog
) -> None:
    queue = names.queue()
    lock = threading.Lock()
    running, peak, threads = [0], [0], set()

    def slow(message: Order, ctx: mqkit.Context) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.add(threading.current_thread().name)
        time.sleep(0.3)
        with lock:
            running[0] -= 1

    got = Recorder(slow)
    with client_for() as client:
        client.producer(Order, queue=queue).publish_many([order(i) for i in range(8)])
        with client.consumer(queue, Order, got, concurrency=4) as consumer:
            got.wait(8)
            eventually(lambda: running[0] == 0)
            time.sleep(0.5)
            assert consumer.attached  # acks out of order never upset the broker
    assert len(got.items) == 8 and raw.count(queue) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert peak[0] == 4
    assert len(threads) == 4 and all(name.startswith("mqkit-") for name in threads)
    assert threading.main_thread().name not in threads


def test_graceful_stop_finishes_running_and_returns_prefetched(client_for, names, raw) -> None:
    queue = names.queue()
    entered = threading.Event()
    release = threading.Event()

    def held(message: Order, ctx: mqkit.Context) -> None:
        entered.set()
        release.wait(10)

    got = Recorder(held)
    with client_for() as client:
        client.producer(Order, queue=queue).publish_many([order(i) for i in range(5)])
        consumer = client.consumer(queue, Order, got, prefetch=10)
        consumer.start()
        assert consumer.started and consumer.attached
        assert entered.wait(10)
        stopper = threading.Thread(target=consumer.stop, kwargs={"timeout": 10})
        stopper.start()
        time.sleep(0.5)
        assert stopper.is_alive()  # waiting for the running handler
        release.set()
        stopper.join(10)
        assert not stopper.is_alive()
        assert not consumer.started and not consumer.attached
        consumer.stop()  # idempotent
        assert client.health().consumers == 0
    assert len(got.items) == 1
    eventually(lambda: raw.count(queue) == 4, what="the four unstarted messages back")


class FakeChannel:
    """Records acks and nacks (for the ack batching below, no broker needed)."""

    is_open = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append(("ack", tag, multiple))

    def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.sent.append(("nack", tag, multiple))


def test_acks_batch_contiguous_tags_and_never_cover_running_ones() -> None:
    from mqkit._sync.acks import ACK, REQUEUE, Acks

    channel = FakeChannel()
    acks = Acks(channel, lambda fn: None)  # type: ignore[arg-type]  # flushed by hand below
    for tag in range(1, 8):
        acks.window.delivered(tag)
    for tag in (2, 1, 3):
        acks.finish(tag, ACK)
    acks.flush(everything=True)
    assert channel.sent == [("ack", 3, True)]  # 1..3 in one frame
    acks.finish(5, ACK)
    acks.flush(everything=True)
    assert channel.sent[-1] == ("ack", 5, False)  # 4 still running: 5 alone
    acks.finish(6, REQUEUE)
    acks.finish(4, ACK)
    acks.flush(everything=True)
    assert channel.sent[-2:] == [("nack", 6, False), ("ack", 4, True)]  # 5 and 6 settled
    older = Acks(channel, lambda fn: None)  # type: ignore[arg-type]
    older.window.delivered(7)
    older.alive = False  # a delivery of an older channel: dropped
    older.finish(7, ACK)
    older.flush(everything=True)
    assert len(channel.sent) == 4
    acks.finish(7, ACK)
    acks.flush(everything=True)
    assert channel.sent[-1] == ("ack", 7, True)
    acks.flush(everything=True)
    assert len(channel.sent) == 5


# ---------------------------------------------------------------------------- run()


def test_stop_keeps_to_its_timeout_when_the_broker_does_not_answer(names, broker_url) -> None:
    # A busy handler and a broker that does not answer the cancel: the cancel, the wait for
    # the handler and the close share one deadline (plus the documented slack).
    queue = names.queue()
    release = threading.Event()
    busy = Recorder(lambda message, ctx: release.wait(10))
    with (
        FaultProxy(broker_url) as proxy,
        mqkit.Client(url=proxy.url, connect_timeout=5) as client,
    ):
        client.producer(Order, queue=queue).publish(order(1))
        consumer = client.consumer(queue, Order, busy)
        consumer.start()
        busy.wait(1)
        proxy.blackhole()
        started = time.monotonic()
        consumer.stop(timeout=1)
        took = time.monotonic() - started
        release.set()
        proxy.restore()
        assert took < 1 + 1.0 + 1.5  # timeout, the documented slack, scheduling noise


def test_bus_stop_stops_its_subscriptions_at_once(client_for, names) -> None:
    release = threading.Event()
    busy = Recorder(lambda message, ctx: release.wait(15))
    with client_for() as client:
        bus = client.event_bus(exchange=names.exchange(), service=names.service())
        for _ in range(4):  # four subscriptions to one event, each with its own queue
            bus.subscribe(SyncOrderPlaced, busy, queue=names.queue())
        bus.start()
        bus.publish(SyncOrderPlaced(order_id="1"))
        busy.wait(4)
        started = time.monotonic()
        bus.stop(timeout=1)
        took = time.monotonic() - started
        release.set()
        # One shared timeout (plus slack), not one each: stopping them in turn takes >= 4 s.
        assert took < 3.0


def test_client_run_until_stop(client_for, names) -> None:
    queue = names.queue()
    with client_for() as client:
        got = Recorder(lambda message, ctx: client.stop())
        client.consumer(queue, Order, got)
        producer = client.producer(Order, queue=queue)
        threading.Timer(0.5, producer.publish, args=(order(1),)).start()
        started = time.monotonic()
        client.run()  # returns once the handler called stop()
        assert time.monotonic() - started < 10
        assert len(got.items) == 1
        assert client.health().consumers == 0  # drained and stopped


def test_client_run_stops_on_sigterm(client_for, names) -> None:
    queue = names.queue()
    previous = signal.getsignal(signal.SIGTERM)
    with client_for() as client:
        got = Recorder()
        client.consumer(queue, Order, got)
        bus = client.event_bus(exchange=names.exchange(), service=names.service())
        bus.subscribe(SyncOrderPlaced, Recorder())

        def publish_then_signal() -> None:
            client.producer(Order, queue=queue).publish(order(1))
            got.wait(1)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=publish_then_signal, daemon=True).start()
        client.run()
        assert len(got.items) == 1
        assert not bus.started
        assert client.health().consumers == 0
    assert signal.getsignal(signal.SIGTERM) == previous


class SignalInsideWait(threading.Event):
    """An Event whose first wait() takes a SIGTERM while it holds its own lock: the moment
    at which a signal handler that takes that lock (``Event.set()``) deadlocks."""

    fired = False

    def wait(self, timeout: float | None = None) -> bool:
        if not self.fired:
            self.fired = True
            with self._cond:  # type: ignore[attr-defined]
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # bytecodes: Python runs the handler among them
                    pass
        return super().wait(timeout)


@pytest.mark.timeout(30)
def test_a_signal_inside_runs_wait_still_stops_it(client_for, names) -> None:
    # Python runs a signal handler on the main thread between two bytecodes, maybe while
    # that thread holds a lock. run()'s handler once called Event.set() on the Event its
    # loop waits on: a SIGTERM that came while the loop held that Event's lock hung the
    # process for good (seen as a program that did not exit on SIGTERM, under load).
    with client_for() as client:
        client.consumer(names.queue(), Order, Recorder())
        client._stop = SignalInsideWait()
        started = time.monotonic()
        client.run(drain_timeout=5)
        assert client._stop.fired
        assert time.monotonic() - started < 10
        assert client.health().consumers == 0


# ---------------------------------------------------------------------------- event bus


def test_bus_each_service_gets_each_event_once(broker_url, names) -> None:
    exchange = names.exchange()
    services = [names.service(), names.service()]
    recorders: dict[tuple[str, int], Recorder] = {}
    clients = []
    try:
        for service in services:
            for instance in range(2):
                client = mqkit.Client(url=broker_url, service=service)
                client.connect()
                clients.append(client)
                bus = client.event_bus(exchange=exchange)
                recorder = recorders[(service, instance)] = Recorder()
                bus.subscribe(SyncOrderPlaced, recorder, prefetch=1)
                bus.start()
        publisher = clients[0].event_bus(exchange=exchange)
        for i in range(20):
            publisher.publish(SyncOrderPlaced(order_id=str(i)))
        for service in services:
            eventually(
                lambda s=service: sum(len(recorders[(s, n)].items) for n in range(2)) >= 20,
                what=f"20 events for {service}",
            )
        time.sleep(0.5)
        for service in services:
            ids = [m.order_id for n in range(2) for m in recorders[(service, n)].messages]
            assert sorted(ids, key=int) == [str(i) for i in range(20)]  # once each
    finally:
        for client in clients:
            client.close()


def test_bus_pattern_and_broadcast_subscriptions(client_for, names) -> None:
    exchange = names.exchange()
    service = names.service()
    audit = Recorder()
    first, second = Recorder(), Recorder()
    with client_for(service=service) as one, client_for(service=service) as two:
        bus_one = one.event_bus(exchange=exchange)
        bus_two = two.event_bus(exchange=exchange)
        bus_one.subscribe("syncrt.orders.*", audit)
        bus_one.subscribe(SyncCacheCleared, first, broadcast=True)
        bus_two.subscribe(SyncCacheCleared, second, broadcast=True)
        with bus_one, bus_two:
            bus_one.publish(SyncOrderPlaced(order_id="1"))
            bus_one.publish(SyncOrderShipped(order_id="1"))
            bus_two.publish(SyncCacheCleared(key="prices"))
            audit.wait(2)
            first.wait(1)
            second.wait(1)  # every instance gets a copy
            assert {type(m) for m in audit.messages} == {SyncOrderPlaced, SyncOrderShipped}
            broadcast_queues = [
                e.name for e in one.topology if isinstance(e, mqkit.Queue) and e.exclusive
            ]
            assert len(broadcast_queues) == 1
        assert not [e for e in one.topology if isinstance(e, mqkit.Queue) and e.exclusive]
        with pytest.raises(mqkit.ConfigError):
            bus_one.subscribe("syncrt.orders.*", audit)
        with pytest.raises(mqkit.PublishUnroutable):
            bus_one.publish(SyncOrderPlaced(order_id="2"), routing_key="nobody", mandatory=True)


# ---------------------------------------------------------------------------- RPC


def test_rpc_round_trip_timeout_and_remote_error(client_for, names) -> None:
    queue, idle = names.queue(), names.queue()

    def answer(message: Order, ctx: mqkit.Context) -> Receipt:
        if message.order_id == "boom":
            raise ValueError("no such order")
        if message.order_id == "int":
            return 42  # type: ignore[return-value]
        return Receipt(order_id=message.order_id, ok=True)

    with client_for() as client:
        client.declare(mqkit.Queue(idle))
        with client.responder(queue, Order, answer):
            assert client.request(queue, order(7), Receipt) == Receipt(order_id="7", ok=True)
            with pytest.raises(mqkit.RemoteError) as info:
                client.request(queue, order("boom"), Receipt)
            assert info.value.error_type == "ValueError"
            assert info.value.error_message == "no such order"
            with pytest.raises(mqkit.RemoteError, match="return a pydantic model"):
                client.request(queue, order("int"), Receipt)
            results: list[Receipt] = []

            def call(n: int) -> None:
                results.append(client.request(queue, order(n), Receipt, timeout=10))

            callers = [threading.Thread(target=call, args=(n,)) for n in range(6)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(20)
            assert sorted(int(r.order_id) for r in results) == list(range(6))
        started = time.monotonic()
        with pytest.raises(mqkit.RequestTimeout, match=idle):
            client.request(idle, order(1), Receipt, timeout=0.5)
        assert time.monotonic() - started < 3
        with pytest.raises(mqkit.PublishUnroutable):
            client.request(names.queue(), order(1), Receipt)


def test_rpc_requests_sent_fail_when_the_publishing_channel_is_replaced(client_for, names) -> None:
    # After a nack the publisher replaces its channel; replies to requests sent on the old
    # one go to the old one, so those requests fail now instead of at their timeout.
    queue = names.queue()
    release = threading.Event()

    def slow(message: Order, ctx: mqkit.Context) -> Receipt:
        release.wait(10)
        return Receipt(order_id=message.order_id, ok=True)

    with client_for() as client, client.responder(queue, Order, slow):
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.request(queue, order(1), Receipt, timeout=20)
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        requester, publisher = client._requester, client._publisher
        eventually(lambda: requester._waiting.in_flight, what="the request to be sent")

        def renew() -> None:
            publisher._renewing = publisher._channel
            publisher._renew()

        started = time.monotonic()
        client._link.submit(renew)
        caller.join(10)
        assert time.monotonic() - started < 5
        assert len(outcome) == 1 and isinstance(outcome[0], mqkit.ConnectionFailed)
        assert "publishing channel was replaced" in str(outcome[0])
        release.set()
        assert client.request(queue, order(2), Receipt).order_id == "2"


# ---------------------------------------------------------------------------- dead letters


def test_dead_letters_count_peek_export_replay_purge(client_for, names, raw) -> None:
    queue = names.queue()
    failing = {"0", "1", "2", "3"}

    def handler(message: Order, ctx: mqkit.Context) -> None:
        if message.order_id in failing:
            if message.order_id == "3":
                raise KeyError("missing")
            raise mqkit.Reject("bad order")

    got = Recorder(handler)
    policy = mqkit.RetryPolicy(max_attempts=1)
    with client_for() as client:
        client.producer(Order, queue=queue).publish_many(
            [order(i) for i in range(4)], headers={"batch": "b1"}
        )
        dead = client.dead_letters(queue)
        assert dead.name == f"{queue}.dlq" and dead.queue == queue
        with client.consumer(queue, Order, got, retry=policy):
            eventually(lambda: dead.count() == 4, what="four dead letters")
        peeked = dead.peek(2)
        assert [letter.error_type for letter in peeked] == ["Reject", "Reject"]
        assert peeked[0].original_queue == queue and peeked[0].attempts == 1
        assert peeked[0].error_message == "bad order"
        assert dead.count() == 4  # nothing removed
        buffer = io.StringIO()
        assert dead.export(buffer) == 4
        lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
        assert [line["error_type"] for line in lines] == ["Reject"] * 3 + ["KeyError"]
        assert dead.count() == 4
        failing.clear()  # the handler is fixed: replays now succeed
        with client.consumer(queue, Order, got, retry=policy):
            progress: list[int] = []
            assert dead.replay(error_type="KeyError", progress=progress.append) == 1
            assert progress == [1]
            assert dead.count() == 3
            target = peeked[1].message_id
            assert dead.replay(message_id=target) == 1
            assert dead.count() == 2
            eventually(lambda: len(got.items) == 6, what="the replayed messages handled")
            replayed = got.contexts[4:]
            assert all(ctx.attempt == 1 for ctx in replayed)
            assert all("x-mqkit-error-type" not in ctx.headers for ctx in replayed)
            assert all(ctx.headers.get("batch") == "b1" for ctx in replayed)
        assert dead.purge() == 2
        assert dead.count() == 0
        assert dead.replay() == 0


def test_replay_to_a_deleted_queue_keeps_the_dead_letter(client_for, names, raw) -> None:
    queue = names.queue()

    def reject(message: Order, ctx: mqkit.Context) -> None:
        raise mqkit.Reject("no")

    with client_for() as client:
        client.producer(Order, queue=queue).publish(order(1))
        dead = client.dead_letters(queue)
        with client.consumer(queue, Order, Recorder(reject)):
            eventually(lambda: dead.count() == 1, what="a dead letter")
        channel = pika.BlockingConnection(pika.URLParameters(raw.url)).channel()
        channel.queue_delete(queue)
        channel.connection.close()
        with pytest.raises(mqkit.PublishUnroutable):
            dead.replay()
        assert dead.count() == 1


# ---------------------------------------------------------------------------- reconnect


def _close_connection(ctl: Any, marker: str) -> int:
    """Close (broker side) every connection whose client properties mention ``marker``
    (``ctl``: the ``broker_ctl`` fixture, rabbitmqctl for the test broker)."""
    listing = ctl.run("-q", "--no-table-headers", "list_connections", "pid", "client_properties")
    pids = [line.split()[0] for line in listing.splitlines() if marker in line]
    for pid in pids:
        ctl.run("close_connection", pid, "test")
    return len(pids)


@pytest.mark.fault
def test_reconnect_after_the_broker_closes_the_connection(
    client_for, names, raw, broker_ctl
) -> None:
    queue = names.queue()
    service = names.service()
    exclusive = mqkit.Queue(names.queue(), type="classic", durable=False, exclusive=True)
    got = Recorder()
    with client_for(service=service) as client:
        client.declare(exclusive)
        producer = client.producer(Order, queue=queue)
        with client.consumer(queue, Order, got, concurrency=2):
            producer.publish(order(1))
            got.wait(1)
            assert client.health().ready
            # Both of the client's connections: publishing, and consuming/declaring.
            assert _close_connection(broker_ctl, f"mqkit:{service}") == 2
            eventually(
                lambda: client.health().reconnects >= 1 and client.health().ready,
                timeout=20,
                what="the reconnect",
            )
            health = client.health()
            assert health.connected and health.consumers == health.consumers_attached == 1
            assert "CONNECTION_FORCED" in (health.last_error or "")
            producer.publish(order(2))
            got.wait(2)
            # topology re-declared on the new connection (an exclusive queue is ours alone)
            assert client.producer(Order, queue=exclusive.name).publish(order(3))
    assert [m.order_id for m in got.messages][-1] == "2"


@pytest.mark.fault
def test_consumers_and_requests_survive_a_cut_link(names, broker_url) -> None:
    queue, rpc = names.queue(), names.queue()
    got = Recorder()
    with (
        FaultProxy(broker_url) as proxy,
        mqkit.Client(url=proxy.url, connect_timeout=5, heartbeat=2) as client,
    ):
        producer = client.producer(Order, queue=queue)
        client.consumer(queue, Order, got).start()
        client.responder(rpc, Order, lambda m, ctx: Receipt(order_id=m.order_id, ok=True))
        runner = threading.Thread(target=client.run, daemon=True)
        runner.start()
        eventually(lambda: client.health().consumers == 2, what="both consumers")
        assert client.request(rpc, order(1), Receipt).ok
        producer.publish(order(1))
        got.wait(1)
        for cut in range(2):
            proxy.cut()
            eventually(
                lambda c=cut: client.health().reconnects > c and client.health().ready,
                timeout=20,
                what="the reconnect",
            )
        producer.publish(order(2))
        got.wait(2)
        assert client.request(rpc, order(2), Receipt).order_id == "2"
        client.stop()
        runner.join(10)
        assert not runner.is_alive()


@pytest.mark.fault
def test_reconnect_fails_over_to_the_next_url(names, broker_url) -> None:
    with (
        FaultProxy(broker_url) as first,
        FaultProxy(broker_url) as second,
        mqkit.Client(urls=[first.url, second.url], connect_timeout=5) as client,
    ):
        producer = client.producer(Order, queue=names.queue())
        assert client.health().url == mask_url(first.url)
        first.refuse(True)
        first.cut()
        eventually(
            lambda: client.health().connected and client.health().reconnects >= 1,
            timeout=20,
            what="the fail-over",
        )
        assert client.health().url == mask_url(second.url)
        assert producer.publish(order(1))


@pytest.mark.fault
def test_publish_many_across_a_cut_loses_nothing(names, broker_url, raw) -> None:
    queue = names.queue()
    with (
        FaultProxy(broker_url) as proxy,
        mqkit.Client(url=proxy.url, connect_timeout=5, confirm_timeout=15) as client,
    ):
        producer = client.producer(Order, queue=queue)
        threading.Timer(0.1, proxy.cut).start()
        ids = producer.publish_many([order(i) for i in range(5000)])
        eventually(lambda: client.health().reconnects >= 1, timeout=20, what="the reconnect")
    stored = {props.message_id for _m, props, _b in raw.drain(queue, limit=10_000)}
    assert set(ids) <= stored  # at-least-once: a message whose confirm was lost is re-sent
