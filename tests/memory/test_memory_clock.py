"""The memory broker's virtual clock: retries that RabbitMQ would hold for minutes (in a
service's retry tiers, queues with a per-queue TTL) come back as soon as the test says so,
with ``broker.advance(seconds)`` or ``broker.run_until_idle()``, on both clients."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from pydantic import BaseModel

import mqkit
from mqkit.testing.memory import MemoryBroker
from mqkit.testing.pytest_plugin import Recorder
from mqkit.topology import retry_tier_name

POLICY = mqkit.RetryPolicy(max_attempts=3, delays=(30, 60))


class Charge(BaseModel):
    order_id: str


class Attempts(Recorder):
    """A handler that notes every attempt, failed or not (``tried``), then fails while
    ``fails(message, ctx)`` says so. (Recorder itself records only what its handler
    returned from.)"""

    def __init__(self, fails: Callable[[Charge, mqkit.Context], bool]) -> None:
        self.tried: list[tuple[str, int]] = []

        def behaviour(message: Charge, ctx: mqkit.Context) -> None:
            self.tried.append((message.order_id, ctx.attempt))
            if fails(message, ctx):
                raise RuntimeError(f"card declined (attempt {ctx.attempt})")

        super().__init__(behaviour)


def fails_first(times: int) -> Attempts:
    """Fails the first ``times`` attempts of each message, then succeeds."""
    return Attempts(lambda message, ctx: ctx.attempt <= times)


def always_fails() -> Attempts:
    return Attempts(lambda message, ctx: True)


def attempts(recorder: Attempts) -> list[tuple[str, int]]:
    return list(recorder.tried)


def test_retries_held_for_minutes_come_back_at_once(mqkit_memory: MemoryBroker) -> None:
    handled = fails_first(2)
    with mqkit.Client(url=mqkit_memory.url, service="billing") as client:
        started = time.monotonic()
        client.producer(Charge, queue="charges").publish(Charge(order_id="A"))
        with client.consumer("charges", Charge, handled, retry=POLICY):
            mqkit_memory.run_until_idle()
            elapsed = time.monotonic() - started
    assert attempts(handled) == [("A", 1), ("A", 2), ("A", 3)]
    assert handled.messages == [Charge(order_id="A")]  # handled once without failing
    assert elapsed < 1.0, f"90 s of retry delays took {elapsed:.2f} s of real time"
    assert mqkit_memory.count("charges.dlq") == 0
    assert mqkit_memory.count("charges") == 0


async def test_async_retries_held_for_minutes_come_back_at_once(
    mqkit_memory: MemoryBroker,
) -> None:
    handled = fails_first(2)
    async with mqkit.AsyncClient(url=mqkit_memory.url, service="billing") as client:
        started = time.monotonic()
        producer = await client.producer(Charge, queue="charges")
        await producer.publish(Charge(order_id="A"))
        async with client.consumer("charges", Charge, handled, retry=POLICY):
            await mqkit_memory.run_until_idle_async()
            elapsed = time.monotonic() - started
    assert attempts(handled) == [("A", 1), ("A", 2), ("A", 3)]
    assert elapsed < 1.0, f"90 s of retry delays took {elapsed:.2f} s of real time"
    assert mqkit_memory.count("charges.dlq") == 0


def test_advance_brings_back_exactly_the_retries_that_are_due(
    mqkit_memory: MemoryBroker,
) -> None:
    tier30 = retry_tier_name("billing", 30)
    tier60 = retry_tier_name("billing", 60)
    handled = always_fails()
    with mqkit.Client(url=mqkit_memory.url, service="billing") as client:
        producer = client.producer(Charge, queue="charges")
        with client.consumer("charges", Charge, handled, retry=POLICY):
            producer.publish(Charge(order_id="A"))
            mqkit_memory.settle()
            mqkit_memory.advance(10)
            producer.publish(Charge(order_id="B"))  # fails 10 s after A
            mqkit_memory.settle()
            assert attempts(handled) == [("A", 1), ("B", 1)]
            assert mqkit_memory.count(tier30) == 2

            mqkit_memory.advance(19.9)  # t=29.9: nothing is due
            mqkit_memory.settle()
            assert len(handled.tried) == 2
            mqkit_memory.advance(0.1)  # t=30: A's first retry, not B's
            mqkit_memory.settle()
            assert attempts(handled)[2:] == [("A", 2)]
            assert (mqkit_memory.count(tier30), mqkit_memory.count(tier60)) == (1, 1)
            mqkit_memory.advance(10)  # t=40: B's
            mqkit_memory.settle()
            assert attempts(handled)[3:] == [("B", 2)]
            assert (mqkit_memory.count(tier30), mqkit_memory.count(tier60)) == (0, 2)

            mqkit_memory.advance(59)  # t=99: A's second retry is due at 90
            mqkit_memory.settle()
            assert attempts(handled)[4:] == [("A", 3)]
            assert mqkit_memory.count("charges.dlq") == 1  # A gave up after 3 attempts
            mqkit_memory.advance(1)  # t=100: B's
            mqkit_memory.settle()
            assert attempts(handled)[5:] == [("B", 3)]
    dead = [m.decode(Charge).order_id for m in mqkit_memory.peek("charges.dlq")]
    assert dead == ["A", "B"]
    [first] = mqkit_memory.peek("charges.dlq", limit=1)
    assert first.headers["x-mqkit-attempts"] == 3
    assert first.headers["x-mqkit-error-type"] in ("RuntimeError", b"RuntimeError")
    assert mqkit_memory.next_expiry() is None


def test_retry_signal_with_a_delay_waits_on_the_clock(mqkit_memory: MemoryBroker) -> None:
    tried: list[int] = []

    def later(message: Charge, ctx: mqkit.Context) -> None:
        tried.append(ctx.attempt)
        if ctx.attempt == 1:
            raise mqkit.Retry(delay=60)  # the 60 s tier

    handled = Recorder(later)
    with mqkit.Client(url=mqkit_memory.url, service="billing") as client:
        client.producer(Charge, queue="charges").publish(Charge(order_id="A"))
        with client.consumer("charges", Charge, handled, retry=POLICY):
            mqkit_memory.settle()
            assert mqkit_memory.next_expiry() == pytest.approx(60, abs=0.5)
            mqkit_memory.advance(59)
            mqkit_memory.settle()
            assert tried == [1]
            mqkit_memory.advance(1)
            mqkit_memory.settle()
    assert tried == [1, 2]
    assert [c.attempt for c in handled.contexts] == [2]  # the one that returned


def test_run_until_idle_leaves_the_dead_letters(mqkit_memory: MemoryBroker) -> None:
    handled = always_fails()
    with mqkit.Client(url=mqkit_memory.url, service="billing") as client:
        client.producer(Charge, queue="charges").publish_many(
            [Charge(order_id=o) for o in ("A", "B", "C")]
        )
        with client.consumer("charges", Charge, handled, retry=POLICY):
            mqkit_memory.run_until_idle()
    assert len(handled.tried) == 9  # 3 messages x 3 attempts
    assert handled.items == []
    assert sorted(m.decode(Charge).order_id for m in mqkit_memory.peek("charges.dlq")) == [
        "A",
        "B",
        "C",
    ]
    assert mqkit_memory.idle()


async def test_async_advance_then_settle(mqkit_memory: MemoryBroker) -> None:
    handled = fails_first(1)
    async with mqkit.AsyncClient(url=mqkit_memory.url, service="billing") as client:
        producer = await client.producer(Charge, queue="charges")
        async with client.consumer("charges", Charge, handled, retry=POLICY):
            await producer.publish(Charge(order_id="A"))
            await mqkit_memory.settle_async()
            assert attempts(handled) == [("A", 1)]
            mqkit_memory.advance(29)
            await mqkit_memory.settle_async()
            assert attempts(handled) == [("A", 1)]
            mqkit_memory.advance(1)
            await mqkit_memory.settle_async()
    assert attempts(handled) == [("A", 1), ("A", 2)]
