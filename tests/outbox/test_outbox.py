"""The outbox against a real broker and a real database: each test runs on PostgreSQL and
SQLite (``db``), with the blocking and the asyncio runtime (``side``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from typing import Any

import pika
from outbox_helpers import wait_for
from pydantic import BaseModel

import mqkit
from mqkit.outbox import Outbox


class Charge(BaseModel):
    order_id: str
    note: str = ""


class Placed(mqkit.Event, event_type="outbox_test.placed"):
    order_id: str


class Nobody(mqkit.Event, event_type="outbox_test.nobody_listens"):
    order_id: str


def declare(
    url: str, *, exchange: str | None = None, queue: str | None = None, key: str = ""
) -> None:
    """Declare a topic exchange and/or a classic queue bound to it, as a plain client would."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        if exchange is not None:
            channel.exchange_declare(exchange, "topic", durable=True)
        if queue is not None:
            channel.queue_declare(queue, durable=True)
            if exchange is not None:
                channel.queue_bind(queue, exchange, key)
    finally:
        connection.close()


def bind(url: str, exchange: str, queue: str, key: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_bind(queue, exchange, key)
    finally:
        connection.close()


def drained(
    raw: Any, queue: str, count: int, timeout: float = 15.0
) -> list[tuple[Any, Any, bytes]]:
    """Wait until ``queue`` holds ``count`` messages, then take them all."""
    wait_for(
        lambda: raw.exists(queue) and raw.count(queue) >= count,
        timeout,
        f"{count} message(s) in {queue}",
    )
    return list(raw.drain(queue))


def test_a_commit_publishes_its_rows_and_a_rollback_nothing(side, names, raw) -> None:
    queue = names.queue()
    with side.connected(service="orders-svc") as s:
        outbox = s.outbox(poll_interval=30.0)  # only the commit's wake-up can be this prompt
        with s.relay(outbox):
            started = time.monotonic()
            ids = s.write(
                outbox,
                [
                    (
                        Charge(order_id="1"),
                        {
                            "queue": queue,
                            "headers": {"h": "v", "n": [1, 2]},
                            "correlation_id": "c1",
                        },
                    ),
                    (Charge(order_id="2"), {"queue": queue, "message_id": "mine-2"}),
                ],
            )
            s.write(outbox, [(Charge(order_id="rolled back"), {"queue": queue})], rollback=True)
            ids += s.write(outbox, [(Charge(order_id="3"), {"queue": queue})], orm=True)
            got = drained(raw, queue, 3)
            latency = time.monotonic() - started
            stats = s.run(outbox.stats)
    assert ids[1] == "mine-2"
    assert [json.loads(body)["order_id"] for _, _, body in got] == ["1", "2", "3"]
    assert [props.message_id for _, props, _ in got] == ids
    first = got[0][1]
    mine = {k: v for k, v in (first.headers or {}).items() if not k.startswith("x-")}
    assert mine == {"h": "v", "n": [1, 2]}
    assert first.correlation_id == "c1"
    assert first.app_id == "orders-svc"
    assert first.type == "Charge"
    assert first.content_type == "application/json"
    assert first.delivery_mode == 2
    assert abs(int(first.timestamp) - time.time()) < 60
    assert latency < 5.0, f"took {latency:.1f}s: the relay did not wake up on the commit"
    # The rolled-back row never existed: nothing is left to send, ever.
    assert (stats.pending, stats.parked, stats.sent) == (0, 0, 3)
    assert raw.count(queue) == 0


def test_events_go_to_the_bus_and_other_rows_to_their_exchange(
    side, names, raw, broker_url
) -> None:
    placed_q, routed_q, elsewhere = names.queue(), names.queue(), names.exchange()
    declare(broker_url, exchange=side.events_exchange, queue=placed_q, key="outbox_test.placed")
    declare(broker_url, exchange=elsewhere, queue=routed_q, key="charges.eu")
    with side.connected() as s:
        outbox = s.outbox()
        with s.relay(outbox):
            s.write(
                outbox,
                [
                    (Placed(order_id="7"), {}),
                    (Nobody(order_id="7"), {}),  # no subscriber: fine on the bus
                    (Charge(order_id="7"), {"exchange": elsewhere, "routing_key": "charges.eu"}),
                ],
            )
            events = drained(raw, placed_q, 1)
            routed = drained(raw, routed_q, 1)
            wait_for(lambda: s.run(outbox.stats).sent == 3, what="3 rows sent")
            stats = s.run(outbox.stats)
    method, props, body = events[0]
    assert method.exchange == side.events_exchange
    assert method.routing_key == "outbox_test.placed"
    assert props.type == "outbox_test.placed"
    assert json.loads(body) == {"order_id": "7"}
    assert routed[0][0].routing_key == "charges.eu"
    assert (stats.pending, stats.parked) == (0, 0)


def test_rows_of_one_ordering_key_go_out_in_order_across_relays(side, names, raw) -> None:
    queue = names.queue()
    keys = ("a", "b", "c")
    with side.connected() as s:
        outbox = s.outbox(batch_size=7, poll_interval=0.05)
        relays = [s.relay(outbox), s.relay(outbox)]
        for relay in relays:
            relay.start()
        try:
            for n in range(10):
                for key in keys:
                    s.write(
                        outbox,
                        [
                            (
                                Charge(order_id=key, note=str(n)),
                                {"queue": queue, "ordering_key": key},
                            )
                        ],
                    )
            got = drained(raw, queue, 30)
        finally:
            for relay in relays:
                relay.stop()
    seen: dict[str, list[int]] = {key: [] for key in keys}
    for _, _, body in got:
        charge = Charge.model_validate_json(body)
        seen[charge.order_id].append(int(charge.note))
    assert seen == {key: list(range(10)) for key in keys}


def test_several_relays_never_publish_one_row_twice(side, names, raw) -> None:
    queue = names.queue()
    with side.connected() as s:
        outbox = s.outbox(batch_size=5, poll_interval=0.05)
        ids = s.write(outbox, [(Charge(order_id=str(n)), {"queue": queue}) for n in range(120)])
        relays = [s.relay(outbox) for _ in range(4)]
        for relay in relays:
            relay.start()
        try:
            got = drained(raw, queue, 120)
            wait_for(lambda: s.run(outbox.stats).pending == 0, what="no pending row")
            time.sleep(0.3)  # a second copy of anything would have arrived by now
            got += raw.drain(queue)
        finally:
            for relay in relays:
                relay.stop()
    published = [props.message_id for _, props, _ in got]
    assert sorted(published) == sorted(ids), "a row was published twice, or not at all"
    assert sum(relay.sent for relay in relays) == 120
    working = [relay.sent for relay in relays if relay.sent]
    if side.db.kind == "sqlite":
        assert len(working) == 1, f"SQLite relays must take turns, but {working} sent rows"
    print(f"\n{side.db.kind}/{side.name}: rows sent per relay: {[r.sent for r in relays]}")


def test_a_row_that_keeps_failing_is_parked_and_holds_back_its_key(
    side, names, raw, broker_url
) -> None:
    queue, nowhere = names.queue(), names.exchange()
    declare(broker_url, exchange=nowhere)  # exists, nothing bound: unroutable
    with side.connected(max_message_size=4096) as s:
        outbox = s.outbox(max_attempts=2, retry_delays=(0.05,), poll_interval=0.05)
        with s.relay(outbox):
            s.write(
                outbox,
                [
                    (
                        Charge(order_id="lost"),
                        {"exchange": nowhere, "routing_key": "void", "ordering_key": "k1"},
                    ),
                    (Charge(order_id="after lost"), {"queue": queue, "ordering_key": "k1"}),
                    (Charge(order_id="big", note="x" * 10_000), {"queue": queue}),
                    (Charge(order_id="fine"), {"queue": queue, "ordering_key": "k2"}),
                ],
            )
            wait_for(lambda: len(s.run(outbox.parked)) == 2, what="2 parked rows")
            first = drained(raw, queue, 1)
            time.sleep(0.3)  # "after lost" stays held back behind its parked key
            assert raw.count(queue) == 0
            parked = {row.routing_key: row for row in s.run(outbox.parked)}
            lost, big = parked["void"], parked[queue]
            assert lost.attempts == 2 and lost.ordering_key == "k1"
            assert lost.last_error is not None and "PublishUnroutable" in lost.last_error
            assert lost.target == f"exchange {nowhere!r} (key 'void')"
            assert big.attempts == 1  # too large is hopeless: parked at once
            assert big.last_error is not None and "PublishTooLarge" in big.last_error
            assert big.size > 10_000
            # Bind a queue, retry the unroutable row: it goes, then the row it held back.
            bind(broker_url, nowhere, queue, "void")
            assert s.run(lambda conn: outbox.retry(conn, [lost.id])) == 1
            rest = drained(raw, queue, 2)
            assert s.run(lambda conn: outbox.purge(conn, [big.id])) == 1
            stats = s.run(outbox.stats)
    assert [json.loads(b)["order_id"] for _, _, b in first] == ["fine"]
    assert [json.loads(b)["order_id"] for _, _, b in rest] == ["lost", "after lost"]
    assert (stats.pending, stats.parked, stats.sent) == (0, 0, 3)


def test_sent_rows_are_deleted_after_the_retention(side, names, raw) -> None:
    queue = names.queue()
    with side.connected() as s:
        outbox = s.outbox(retention=0.0, cleanup_interval=0.05, poll_interval=0.05)
        with s.relay(outbox):
            s.write(outbox, [(Charge(order_id=str(n)), {"queue": queue}) for n in range(5)])
            drained(raw, queue, 5)
            wait_for(lambda: s.run(outbox.stats).sent == 0, what="sent rows deleted")
            stats = s.run(outbox.stats)
    assert (stats.pending, stats.parked, stats.sent) == (0, 0, 0)


def test_publish_pending_publishes_what_is_due_and_parks_a_missing_exchange(
    side, names, raw
) -> None:
    queue, missing = names.queue(), names.exchange()
    with side.connected() as s:
        outbox = s.outbox(max_attempts=1)
        s.write(
            outbox,
            [
                (Charge(order_id="1"), {"queue": queue}),
                (Charge(order_id="2"), {"exchange": missing, "routing_key": "k"}),
            ],
        )
        relay = s.relay(outbox)
        assert relay.publish_pending() == 1
        assert relay.publish_pending() == 0
        relay.stop()
        parked = s.run(outbox.parked)
    assert len(drained(raw, queue, 1)) == 1
    assert [row.exchange for row in parked] == [missing]
    assert parked[0].last_error is not None and missing in parked[0].last_error


def test_the_tables_can_live_in_a_schema_of_their_own(pg_url: str) -> None:
    from sqlalchemy import create_engine, text

    from mqkit.outbox import Inbox, Outbox, store

    schema = f"s{time.time_ns() % 10**9}"
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        outbox = Outbox(engine, schema=schema)
        inbox = Inbox(engine, schema=schema)
        with engine.begin() as conn:
            message_id = outbox.publish(conn, Charge(order_id="1"), queue="q", ordering_key="k")
            inbox.create_tables(conn)
            assert store.record(conn, inbox.table, consumer="q", message_id="m", now=1.0)
        with engine.begin() as conn:
            [row] = store.claim(conn, outbox.table, now=time.time(), limit=10)
            tables = {
                name
                for (name,) in conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"
                    ),
                    {"s": schema},
                )
            }
        assert row.message_id == message_id
        assert tables == {"mqkit_outbox", "mqkit_inbox"}
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def test_a_stopping_relay_publishes_what_was_committed_before(side, names, raw) -> None:
    queue = names.queue()
    with side.connected() as s:
        outbox = s.outbox(poll_interval=30.0)
        relay = s.relay(outbox)
        relay.start()
        time.sleep(0.3)  # its first pass found nothing: next look in 30s
        # Written through another Outbox (as another process would): nothing wakes the relay.
        other = Outbox(side.db.engine(), table_prefix=side.db.prefix)
        engine = other.sync_engine
        with engine.begin() as conn:
            ids = [other.publish(conn, Charge(order_id=str(n)), queue=queue) for n in range(3)]
        relay.stop()
        sent = relay.sent
    assert sent == 3
    assert [props.message_id for _, props, _ in drained(raw, queue, 3)] == ids


def test_client_run_starts_and_stops_the_relay(side, names, raw) -> None:
    """A relay made with ``client.outbox_relay`` is started by ``client.run()`` (rows written
    before and while it runs go out) and stopped when ``run()`` returns."""
    queue = names.queue()
    with side.connected() as s:
        outbox = s.outbox(poll_interval=30.0)
        relay = s.client.outbox_relay(outbox)
        side._do(s.client.producer(Charge, queue=queue))  # declares the queue
        s.write(outbox, [(Charge(order_id="before run"), {"queue": queue})])
        if side.is_async:
            loop = side.loop.loop
            done = asyncio.run_coroutine_threadsafe(s.client.run(), loop)
            stop = lambda: loop.call_soon_threadsafe(s.client.stop)  # noqa: E731
        else:
            pool = concurrent.futures.ThreadPoolExecutor(1)
            done = pool.submit(s.client.run)  # run() off the main thread: no signal handlers
            stop = s.client.stop
        try:
            first = drained(raw, queue, 1)
            s.write(outbox, [(Charge(order_id="while running"), {"queue": queue})])
            second = drained(raw, queue, 1)
            assert relay.started
        finally:
            stop()
            done.result(timeout=30)
        assert not relay.started
    assert [json.loads(body)["order_id"] for _, _, body in first + second] == [
        "before run",
        "while running",
    ]
