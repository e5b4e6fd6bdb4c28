"""Retries held by the broker, in-process immediate retries, and dead-lettering.

Each client gets a service of the test's own (``names.service()``): a service's retry tiers
(``<service>.retries.<n>ms``) are then the test's, and deleted after it. The tiers
themselves, shared by a service's consumers, are tested in test_retry_tiers.py.

Recorders are passed as ``recorder.__call__``: the harness makes functions and bound methods
(not callable objects) ``async def`` for AsyncClient.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from conftest import wait_until
from pydantic import BaseModel

import mqkit


class Order(BaseModel):
    order_id: str
    amount: Decimal


def order(i: int) -> Order:
    return Order(order_id=str(i), amount=Decimal(i))


def text(value):
    return value.decode() if isinstance(value, bytes) else value


class Calls:
    """Every handler call: (attempt, monotonic time, order_id, message_id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[int, float, str, str | None]] = []

    def record(self, message: Order, ctx: mqkit.Context) -> None:
        with self.lock:
            self.items.append((ctx.attempt, time.monotonic(), message.order_id, ctx.message_id))

    @property
    def attempts(self) -> list[int]:
        with self.lock:
            return [a for a, _, _, _ in self.items]

    @property
    def times(self) -> list[float]:
        with self.lock:
            return [t for _, t, _, _ in self.items]

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def take_dead_letters(raw, queue: str, count: int, timeout: float = 15.0):
    dlq = f"{queue}.dlq"
    wait_until(lambda: raw.count(dlq) >= count, timeout=timeout, what=f"{count} in {dlq}")
    time.sleep(0.2)
    got = raw.drain(dlq)
    assert len(got) == count, f"expected {count} dead letters, got {len(got)}"
    return got


def test_transient_failure_succeeds_on_a_later_attempt(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def flaky(message, ctx):
        calls.record(message, ctx)
        if ctx.attempt < 3:
            raise ConnectionError(f"transient failure on attempt {ctx.attempt}")

    received = collector(flaky)
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, received.__call__, retry=policy),
    ):
        message_id = client.producer(Order, queue=queue).publish(order(1))
        received.wait(1, timeout=15)
        assert received.settle(0.3) == 1
    assert calls.attempts == [1, 2, 3]
    assert {m for _, _, _, m in calls.items} == {message_id}  # the same message each time
    [ctx] = received.contexts
    assert ctx.attempt == 3
    assert raw.count(f"{queue}.dlq") == 0
    assert raw.count(queue) == 0


def test_permanent_failure_is_dead_lettered_with_every_reason(rt, names, collector, raw):
    exchange, queue, service = names.exchange(), names.queue(), names.service()
    calls = Calls()

    def broken(message, ctx):
        calls.record(message, ctx)
        raise ValueError(f"cannot charge order {message.order_id}")

    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,))
    with rt.client(service=service) as client:
        client.declare(mqkit.Exchange(exchange))
        with client.consumer(queue, Order, collector(broken).__call__, retry=policy):
            client.declare(mqkit.Binding(exchange, queue, "orders.#"))
            before = datetime.now(timezone.utc)
            message_id = client.producer(Order, exchange=exchange).publish(
                order(42), routing_key="orders.new", headers={"tenant": "acme"}
            )
            [(_, props, body)] = take_dead_letters(raw, queue, 1)
            after = datetime.now(timezone.utc)
    assert calls.attempts == [1, 2, 3]
    # The message is kept as it was published...
    assert json.loads(body) == {"order_id": "42", "amount": "42"}
    assert props.message_id == message_id
    assert props.type == "Order"
    assert props.app_id == service
    headers = {k: text(v) for k, v in props.headers.items()}
    assert headers["tenant"] == "acme"
    # ...and says why it failed.
    assert headers["x-mqkit-error-type"] == "ValueError"
    assert headers["x-mqkit-error-message"] == "cannot charge order 42"
    assert "ValueError" in headers["x-mqkit-traceback"]
    assert "broken" in headers["x-mqkit-traceback"]
    assert int(headers["x-mqkit-attempts"]) == 3
    assert headers["x-mqkit-original-queue"] == queue
    assert headers["x-mqkit-original-exchange"] == exchange
    assert headers["x-mqkit-original-routing-key"] == "orders.new"
    assert headers["x-mqkit-service"] == service
    assert headers["x-mqkit-host"] == socket.gethostname()
    failed_at = datetime.fromisoformat(headers["x-mqkit-failed-at"])
    assert before - timedelta(seconds=2) <= failed_at <= after + timedelta(seconds=2)
    assert raw.count(queue) == 0


def test_retried_message_has_the_route_it_came_by_and_its_first_in_headers(rt, names, collector):
    exchange, queue = names.exchange(), names.queue()
    calls = Calls()
    contexts = []

    def flaky(message, ctx):
        calls.record(message, ctx)
        contexts.append(ctx)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")

    received = collector(flaky)
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,))
    with rt.client(service=names.service()) as client:
        client.declare(mqkit.Exchange(exchange))
        with client.consumer(queue, Order, received.__call__, retry=policy):
            client.declare(mqkit.Binding(exchange, queue, "orders.#"))
            client.producer(Order, exchange=exchange, routing_key="orders.new").publish(order(1))
            received.wait(1, timeout=15)
    assert [c.attempt for c in contexts] == [1, 2]
    # The context's route is the delivery's (headers can be forged): a retry comes back by
    # the default exchange, routed by the queue's name. Its first route is in headers.
    assert [(c.exchange, c.routing_key) for c in contexts] == [
        (exchange, "orders.new"),
        ("", queue),
    ]
    assert contexts[1].headers["x-mqkit-original-exchange"] == exchange
    assert contexts[1].headers["x-mqkit-original-routing-key"] == "orders.new"


def test_reject_dead_letters_at_once(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def rejecting(message, ctx):
        calls.record(message, ctx)
        raise mqkit.Reject("order 1 is not ours")

    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, collector(rejecting).__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        [(_, props, _)] = take_dead_letters(raw, queue, 1)
        time.sleep(0.3)
    assert calls.attempts == [1]
    assert text(props.headers["x-mqkit-error-type"]) == "Reject"
    assert text(props.headers["x-mqkit-error-message"]) == "order 1 is not ours"
    assert int(props.headers["x-mqkit-attempts"]) == 1


def test_give_up_on_dead_letters_at_once(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def missing(message, ctx):
        calls.record(message, ctx)
        raise KeyError("sku-7")

    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,), give_up_on=(LookupError,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, collector(missing).__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        [(_, props, _)] = take_dead_letters(raw, queue, 1)
        time.sleep(0.3)
    assert calls.attempts == [1]
    assert text(props.headers["x-mqkit-error-type"]) == "KeyError"
    assert "sku-7" in text(props.headers["x-mqkit-error-message"])
    assert int(props.headers["x-mqkit-attempts"]) == 1


def test_retry_on_limits_broker_retries(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def buggy(message, ctx):
        calls.record(message, ctx)
        raise ZeroDivisionError("a bug, not a transient failure")

    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,), retry_on=(ConnectionError,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, collector(buggy).__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        [(_, props, _)] = take_dead_letters(raw, queue, 1)
    assert calls.attempts == [1]
    assert text(props.headers["x-mqkit-error-type"]) == "ZeroDivisionError"


def test_retry_signal_counts_as_an_attempt_and_picks_a_tier(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def later(message, ctx):
        calls.record(message, ctx)
        if ctx.attempt == 1:
            raise mqkit.Retry(delay=0.3)

    received = collector(later)
    # Tiers 0.1 s and 0.5 s: Retry(delay=0.3) must wait in the 0.5 s tier.
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1, 0.5))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, received.__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        received.wait(1, timeout=15)
    assert calls.attempts == [1, 2]
    assert received.contexts[0].attempt == 2
    first, second = calls.times
    assert second - first >= 0.5 - 0.05
    assert raw.count(f"{queue}.dlq") == 0


def test_retry_signal_at_max_attempts_dead_letters(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def always_later(message, ctx):
        calls.record(message, ctx)
        raise mqkit.Retry()

    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, collector(always_later).__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        [(_, props, _)] = take_dead_letters(raw, queue, 1)
    assert calls.attempts == [1, 2]
    assert text(props.headers["x-mqkit-error-type"]) == "Retry"
    assert int(props.headers["x-mqkit-attempts"]) == 2


def test_immediate_retries_happen_in_process_first(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def broken(message, ctx):
        calls.record(message, ctx)
        raise RuntimeError("still broken")

    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,), immediate=2)
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, collector(broken).__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        [(_, props, _)] = take_dead_letters(raw, queue, 1)
        time.sleep(0.2)
    # immediate + 1 calls per attempt; the attempt number only grows with a broker retry.
    assert calls.attempts == [1, 1, 1, 2, 2, 2]
    assert int(props.headers["x-mqkit-attempts"]) == 2


def test_immediate_retry_that_succeeds_needs_no_broker_retry(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def flaky(message, ctx):
        calls.record(message, ctx)
        if len(calls) < 3:
            raise ConnectionError("blip")

    received = collector(flaky)
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.1,), immediate=2)
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, received.__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        received.wait(1, timeout=10)
        assert received.settle(0.3) == 1
    assert calls.attempts == [1, 1, 1]
    assert received.contexts[0].attempt == 1
    assert raw.count(f"{queue}.dlq") == 0


def test_retry_delays_are_kept(rt, names, collector, raw):
    queue = names.queue()
    calls = Calls()

    def broken(message, ctx):
        calls.record(message, ctx)
        raise RuntimeError("down")

    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.3, 0.6))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, collector(broken).__call__, retry=policy),
    ):
        client.producer(Order, queue=queue).publish(order(1))
        take_dead_letters(raw, queue, 1)
    assert calls.attempts == [1, 2, 3]
    t1, t2, t3 = calls.times
    assert t2 - t1 >= 0.3 - 0.05
    assert t3 - t2 >= 0.6 - 0.05


def test_thousand_messages_every_id_accounted_for_once(rt, names, raw):
    queue = names.queue()
    lock = threading.Lock()
    processed: list[str] = []
    failing = {str(i) for i in range(1000) if i % 10 == 0}

    def handler(message, ctx):
        if message.order_id in failing:
            raise ValueError(f"order {message.order_id} always fails")
        with lock:
            processed.append(ctx.message_id)

    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Order, handler, retry=policy, concurrency=4),
    ):
        ids = client.producer(Order, queue=queue).publish_many([order(i) for i in range(1000)])
        wait_until(lambda: len(processed) >= 900, timeout=90, what="900 processed")
        wait_until(lambda: raw.count(f"{queue}.dlq") >= 100, timeout=30, what="100 dead letters")
        time.sleep(0.5)
    dead = raw.drain(f"{queue}.dlq")
    dead_ids = [props.message_id for _, props, _ in dead]
    assert len(ids) == len(set(ids)) == 1000
    assert len(processed) == len(set(processed)) == 900, "a message was processed twice"
    assert len(dead_ids) == len(set(dead_ids)) == 100, "a message was dead-lettered twice"
    assert not set(processed) & set(dead_ids)
    assert set(processed) | set(dead_ids) == set(ids)
    assert {json.loads(body)["order_id"] for _, _, body in dead} == failing
    assert all(int(props.headers["x-mqkit-attempts"]) == 2 for _, props, _ in dead)
    assert raw.count(queue) == 0
