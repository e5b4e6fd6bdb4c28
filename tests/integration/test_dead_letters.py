"""DeadLetterQueue: count, peek, replay (with filters), purge, export."""

from __future__ import annotations

import io
import json
import threading
from datetime import datetime
from decimal import Decimal

from conftest import wait_until
from pydantic import BaseModel

import mqkit

ONCE = mqkit.RetryPolicy(max_attempts=1)


class Order(BaseModel):
    order_id: str
    amount: Decimal


def order(key: str) -> Order:
    return Order(order_id=key, amount=Decimal(1))


class Switch:
    """A handler that fails (ValueError, or KeyError for order ids starting with "k") until
    ``fixed`` is set, then records what it handles."""

    def __init__(self) -> None:
        self.fixed = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int]] = []
        self.handled: list[tuple[str | None, str, int]] = []

    def __call__(self, message: Order, ctx: mqkit.Context) -> None:
        with self.lock:
            self.calls.append((message.order_id, ctx.attempt))
        if not self.fixed.is_set():
            if message.order_id.startswith("k"):
                raise KeyError(message.order_id)
            raise ValueError(f"cannot handle {message.order_id}")
        with self.lock:
            self.handled.append((ctx.message_id, message.order_id, ctx.attempt))

    def handler(self):
        # A plain function: the async runtime wraps plain functions into coroutines.
        def handle(message, ctx):
            return self(message, ctx)

        return handle


def fail_into_dlq(client, queue: str, switch: Switch, keys: list[str]) -> tuple[object, list[str]]:
    """Start a consumer that fails every message once into the DLQ; return it and the ids."""
    consumer = client.consumer(queue, Order, switch.handler(), retry=ONCE)
    consumer.start()
    producer = client.producer(Order, queue=queue)
    ids = [producer.publish(order(key)) for key in keys]
    dlq = client.dead_letters(queue)
    wait_until(lambda: dlq.count() == len(keys), timeout=15, what=f"{len(keys)} dead letters")
    return consumer, ids


def test_count_and_peek_remove_nothing(rt, names, raw):
    queue, service = names.queue(), names.service()
    switch = Switch()
    with rt.client(service=service) as client:
        consumer, ids = fail_into_dlq(client, queue, switch, ["a1", "a2", "a3"])
        consumer.stop()
        dlq = client.dead_letters(queue)
        assert dlq.count() == 3
        two = dlq.peek(limit=2)
        assert len(two) == 2
        wait_until(lambda: dlq.count() == 3, timeout=5, what="peeked letters back in the DLQ")
        letters = dlq.peek()
        assert len(letters) == 3
        wait_until(lambda: dlq.count() == 3, timeout=5, what="peeked letters back in the DLQ")
    assert raw.count(f"{queue}.dlq") == 3
    assert {d.message_id for d in letters} == set(ids)
    for dead in letters:
        assert isinstance(dead, mqkit.DeadLetter)
        key = json.loads(dead.body)["order_id"]
        assert dead.error_type == "ValueError"
        assert dead.error_message == f"cannot handle {key}"
        assert dead.attempts == 1
        assert dead.original_queue == queue
        assert isinstance(dead.failed_at, datetime)
        assert dead.headers["x-mqkit-service"] == service


def test_replay_round_trip(rt, names, raw):
    queue = names.queue()
    switch = Switch()
    with rt.client() as client:
        consumer, ids = fail_into_dlq(client, queue, switch, ["r1", "r2"])
        try:
            switch.fixed.set()  # the bug is fixed
            dlq = client.dead_letters(queue)
            assert dlq.replay() == 2
            wait_until(lambda: len(switch.handled) == 2, timeout=10, what="2 replayed handled")
            assert dlq.count() == 0
        finally:
            consumer.stop()
    assert {mid for mid, _, _ in switch.handled} == set(ids)
    # A replay starts afresh: attempt 1.
    assert [attempt for _, _, attempt in switch.handled] == [1, 1]
    assert raw.count(f"{queue}.dlq") == 0
    assert raw.count(queue) == 0


def test_replay_filters_by_error_type_and_message_id(rt, names):
    queue = names.queue()
    switch = Switch()
    with rt.client() as client:
        consumer, ids = fail_into_dlq(client, queue, switch, ["v1", "k1", "v2", "k2"])
        try:
            switch.fixed.set()
            dlq = client.dead_letters(queue)
            assert dlq.replay(error_type="KeyError") == 2
            wait_until(lambda: len(switch.handled) == 2, timeout=10, what="KeyErrors replayed")
            assert sorted(key for _, key, _ in switch.handled) == ["k1", "k2"]
            wait_until(lambda: dlq.count() == 2, timeout=5, what="2 left in the DLQ")
            assert {d.error_type for d in dlq.peek()} == {"ValueError"}

            v2 = ids[2]
            assert dlq.replay(message_id=v2) == 1
            wait_until(lambda: len(switch.handled) == 3, timeout=10, what="v2 replayed")
            assert switch.handled[-1][:2] == (v2, "v2")
            wait_until(lambda: dlq.count() == 1, timeout=5, what="1 left in the DLQ")
            [left] = dlq.peek()
            assert left.message_id == ids[0]
            assert dlq.replay(error_type="NoSuchError") == 0
            assert dlq.replay(message_id="no-such-id") == 0
            wait_until(lambda: dlq.count() == 1, timeout=5, what="non-matching letters kept")
        finally:
            consumer.stop()


def test_replay_limit(rt, names):
    queue = names.queue()
    switch = Switch()
    with rt.client() as client:
        consumer, _ = fail_into_dlq(client, queue, switch, ["l1", "l2", "l3"])
        try:
            switch.fixed.set()
            dlq = client.dead_letters(queue)
            assert dlq.replay(limit=1) == 1
            wait_until(lambda: len(switch.handled) == 1, timeout=10, what="1 replayed")
            wait_until(lambda: dlq.count() == 2, timeout=5, what="2 left")
        finally:
            consumer.stop()


def test_replay_of_a_message_that_fails_again_comes_back(rt, names):
    queue = names.queue()
    switch = Switch()
    with rt.client() as client:
        consumer, [message_id] = fail_into_dlq(client, queue, switch, ["f1"])
        try:
            dlq = client.dead_letters(queue)
            assert dlq.replay() == 1
            wait_until(lambda: len(switch.calls) == 2, timeout=10, what="the second failure")
            wait_until(lambda: dlq.count() == 1, timeout=10, what="back in the DLQ")
            [dead] = dlq.peek()
        finally:
            consumer.stop()
    assert switch.calls == [("f1", 1), ("f1", 1)]
    assert dead.message_id == message_id
    assert dead.attempts == 1
    assert dead.error_type == "ValueError"


def test_replay_with_nothing_to_replay(rt, names):
    queue = names.queue()
    with rt.client() as client:
        # A producer declares the queue and its (empty) DLQ.
        client.producer(Order, queue=queue).publish(order("x"))
        dlq = client.dead_letters(queue)
        assert dlq.count() == 0
        assert dlq.peek() == []
        assert dlq.replay() == 0
        assert dlq.purge() == 0


def test_purge_returns_the_count(rt, names, raw):
    queue = names.queue()
    switch = Switch()
    with rt.client() as client:
        consumer, _ = fail_into_dlq(client, queue, switch, ["p1", "p2", "p3"])
        consumer.stop()
        dlq = client.dead_letters(queue)
        assert dlq.purge() == 3
        assert dlq.count() == 0
    assert raw.count(f"{queue}.dlq") == 0


def test_export_writes_json_lines_and_removes_nothing(rt, names):
    queue = names.queue()
    switch = Switch()
    with rt.client() as client:
        consumer, ids = fail_into_dlq(client, queue, switch, ["e1", "k2", "e3"])
        consumer.stop()
        dlq = client.dead_letters(queue)
        out = io.StringIO()
        assert dlq.export(out) == 3
        wait_until(lambda: dlq.count() == 3, timeout=5, what="exported letters kept")
        limited = io.StringIO()
        assert dlq.export(limited, limit=2) == 2
        wait_until(lambda: dlq.count() == 3, timeout=5, what="exported letters kept")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert {r["message_id"] for r in records} == set(ids)
    by_key = {json.loads(r["body"])["order_id"]: r for r in records}
    assert by_key["k2"]["error_type"] == "KeyError"
    assert by_key["e1"]["error_type"] == "ValueError"
    assert all(r["original_queue"] == queue and r["attempts"] == 1 for r in records)
    assert len(limited.getvalue().splitlines()) == 2
