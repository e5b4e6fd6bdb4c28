"""The inbox against a real broker and a real database, on PostgreSQL and SQLite (``db``) and
both runtimes (``side``): a message id is applied once, in the transaction that records it,
together with what the handler publishes through the outbox."""

from __future__ import annotations

import json
import time
from typing import Any

from outbox_helpers import Received, wait_for
from pydantic import BaseModel
from sqlalchemy import text

import mqkit


class Charge(BaseModel):
    order_id: str


class Receipt(BaseModel):
    order_id: str


def applied_table(db: Any) -> str:
    name = db.table("applied")
    db.sql(f"CREATE TABLE {name} (order_id VARCHAR(50) NOT NULL, message_id VARCHAR(255) NOT NULL)")
    return name


def count(raw: Any, queue: str) -> int:
    return raw.count(queue) if raw.exists(queue) else 0


def test_a_message_id_is_applied_once_with_what_its_handler_publishes(side, names, raw) -> None:
    queue, receipts = names.queue(), names.queue()
    applied = applied_table(side.db)
    calls = Received()
    with side.connected() as s:
        inbox = s.inbox()
        outbox = s.outbox(poll_interval=0.05)

        def charge(message: Charge, ctx: mqkit.Context) -> Any:
            calls.add(message, ctx)

            def effect(conn: Any) -> None:
                conn.execute(
                    text(f"INSERT INTO {applied} VALUES (:o, :m)"),
                    {"o": message.order_id, "m": ctx.message_id},
                )
                outbox.publish(conn, Receipt(order_id=message.order_id), queue=receipts)
                if message.order_id == "flaky" and ctx.attempt == 1:
                    raise RuntimeError("card network down")  # rolls back all of the above
                if message.order_id == "broken":
                    raise RuntimeError("always")

            return effect

        retry = mqkit.RetryPolicy(max_attempts=2, delays=(0.1,))
        s.consume(queue, Charge, charge, inbox=inbox, retry=retry)
        with s.relay(outbox):
            for _ in range(3):
                s.producer_publish(queue, Charge(order_id="once"), message_id="m-once")
            s.producer_publish(queue, Charge(order_id="flaky"), message_id="m-flaky")
            s.producer_publish(queue, Charge(order_id="broken"), message_id="m-broken")
            wait_for(lambda: count(raw, f"{queue}.dlq") == 1, what="'broken' dead-lettered")
            wait_for(lambda: count(raw, receipts) == 2, what="2 receipts")
            wait_for(lambda: inbox.duplicates == 2, what="2 duplicates dropped")
            wait_for(lambda: s.run(outbox.stats).pending == 0, what="outbox drained")
            stats = s.run(outbox.stats)
            recorded = {
                mid: s.run(lambda conn, mid=mid: inbox.recorded(conn, mid, queue))
                for mid in ("m-once", "m-flaky", "m-broken")
            }
        time.sleep(0.2)
        assert count(raw, queue) == 0  # every delivery was acked (or dead-lettered)
    rows = sorted(tuple(r) for r in side.db.sql(f"SELECT order_id, message_id FROM {applied}"))
    assert rows == [("flaky", "m-flaky"), ("once", "m-once")]
    handled = [(m.order_id, c.attempt) for m, c in calls.items]
    assert sorted(handled) == [
        ("broken", 1),
        ("broken", 2),
        ("flaky", 1),
        ("flaky", 2),
        ("once", 1),
    ]
    assert recorded == {"m-once": True, "m-flaky": True, "m-broken": False}
    receipts_got = sorted(json.loads(b)["order_id"] for _, _, b in raw.drain(receipts))
    assert receipts_got == ["flaky", "once"]
    assert (stats.pending, stats.parked, stats.sent) == (0, 0, 2)


def test_ids_are_recorded_per_consumer(side, names, raw) -> None:
    first, second, alias = names.queue(), names.queue(), names.queue()
    calls = Received()
    with side.connected() as s:
        inbox = s.inbox()

        def handle(message: Charge, ctx: mqkit.Context) -> None:
            calls.add(message, ctx)

        s.consume(first, Charge, handle, inbox=inbox)
        s.consume(second, Charge, handle, inbox=inbox)
        s.consume(alias, Charge, handle, inbox=inbox, consumer=first)  # shares first's ids
        for queue in (first, second, alias):
            s.producer_publish(queue, Charge(order_id="1"), message_id="same-id")
        wait_for(lambda: len(calls) + inbox.duplicates == 3, what="3 deliveries")
        time.sleep(0.2)
        recorded = [
            s.run(lambda conn, q=q: inbox.recorded(conn, "same-id", q)) for q in (first, second)
        ]
    assert len(calls) == 2 and inbox.duplicates == 1
    assert {c.queue for c in calls.contexts} >= {second}
    assert recorded == [True, True]


def test_a_message_without_an_id_is_dead_lettered_with_why(side, names, raw) -> None:
    queue = names.queue()
    calls = Received()
    with side.connected() as s:
        s.consume(queue, Charge, lambda m, ctx: calls.add(m, ctx), inbox=s.inbox())
        raw.publish(queue, b'{"order_id": "1"}')  # a plain AMQP client: no message_id
        wait_for(lambda: count(raw, f"{queue}.dlq") == 1, what="a dead letter")
        [(_, props, _)] = raw.drain(f"{queue}.dlq")
    assert len(calls) == 0
    assert "no message_id" in props.headers["x-mqkit-error-message"]


def test_ids_older_than_the_retention_are_forgotten(side, names) -> None:
    queue = names.queue()
    calls = Received()
    with side.connected() as s:
        inbox = s.inbox(retention=0.3, cleanup_interval=0.05)
        s.consume(queue, Charge, lambda m, ctx: calls.add(m, ctx), inbox=inbox)
        s.producer_publish(queue, Charge(order_id="a"), message_id="id-a")
        calls.wait(1)
        time.sleep(0.5)  # id-a expires
        s.producer_publish(queue, Charge(order_id="b"), message_id="id-b")  # cleans up after it
        calls.wait(2)
        wait_for(
            lambda: not s.run(lambda conn: inbox.recorded(conn, "id-a", queue)),
            what="id-a forgotten",
        )
        s.producer_publish(queue, Charge(order_id="a"), message_id="id-a")  # too late: applied
        calls.wait(3)
        b_kept = s.run(lambda conn: inbox.recorded(conn, "id-b", queue))
    assert [m.order_id for m in calls.messages] == ["a", "b", "a"]
    assert b_kept
